"""The one error boundary of the command-line tools (``tda-bench``, ``tda-bench-leaderboard``).

A user error — a config value, a file, a path, a missing extra, a device, a full disk, out of
memory — ends in one sentence (what is wrong, which key or file, what to do) on stderr and
exit status 2; anything else is a programming error and keeps its traceback.
:func:`user_message` tells the two apart and words the sentence: it unwraps Hydra's
instantiate wrapper to the user's own error, renders an
:class:`~estimators.options.OptionError` in config keys (``estimator.damping``), and turns
Hydra's composition errors (an unknown group value, a mistyped key, an override that does not
parse) into one line. :func:`boundary` applies it around a whole command: Hydra is asked to
re-raise (``HYDRA_FULL_ERROR``) instead of printing its own report, so the errors it meets
while composing reach this boundary too. ``TDA_BENCH_DEBUG=1`` (or a ``HYDRA_FULL_ERROR``
the user set) shows every traceback instead.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

from estimators.options import OptionError

DEBUG_VARIABLES = ("TDA_BENCH_DEBUG",)
# Errors whose own message is already the user's sentence.
PLAIN = (ValueError, FloatingPointError)
OWN_PACKAGES = ("bench", "estimators", "tasks", "tda_bench", "conf", "hydra_plugins", "studies")
DISK = {errno.ENOSPC: "no space is left on the device", errno.EDQUOT: "the disk quota is full",
        errno.EROFS: "the file system is read-only", errno.EACCES: "permission is denied",
        errno.EPERM: "the operation is not permitted", errno.ENOTDIR: "a part of the path is "
        "a file, not a directory", errno.ENOENT: "it does not exist", errno.EISDIR: "it is a "
        "directory", errno.ENAMETOOLONG: "the name is too long"}


def debugging() -> bool:
    """Whether tracebacks are wanted instead of one-line messages."""
    return any(os.environ.get(name) for name in DEBUG_VARIABLES)


def user_message(err: BaseException) -> str | None:
    """The one-line sentence for a user error, or None for a programming error."""
    err = unwrap(err)
    if isinstance(err, OptionError):
        return one_line(err.in_config())
    hydra_text = _hydra_message(err)
    if hydra_text is not None:
        return one_line(hydra_text)
    if isinstance(err, MemoryError) or _out_of_memory(err):
        return ("out of memory while running; lower estimator.chunk_size, set memory_budget_mb, "
                "or use a smaller task or model")
    if isinstance(err, ModuleNotFoundError) and err.name and \
            err.name.split(".")[0] not in OWN_PACKAGES:
        return (f"the package {err.name.split('.')[0]!r} is not installed; install it "
                f"(pip install {err.name.split('.')[0]}, or the tda-bench extra that needs it)")
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError | NotADirectoryError) \
            and err.errno in DISK:
        return one_line(disk_message(err))
    if isinstance(err, (*PLAIN, FileNotFoundError, NotADirectoryError)):
        return one_line(str(err)) or type(err).__name__
    if type(err).__name__ == "GroundTruthMissing":  # a RuntimeError with its own sentence
        return str(err)
    return None


def disk_message(err: OSError, what: str = "a file") -> str:
    """``cannot write <file>: no space is left on the device; ...`` for an OSError of a
    write to a full disk (``cannot use <file>: ...`` for a read-only file system, a missing
    permission, a path through a file)."""
    where = err.filename or what
    why = DISK.get(err.errno, err.strerror or str(err))
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {where}: {why}; free some space there or point cache_dir at " \
               "another disk"
    return (f"cannot use {where}: {why}; point cache_dir (the cache) or hydra.run.dir (the "
            "records) at a directory you can write, and input files at ones you can read")


def unwrap(err: BaseException) -> BaseException:
    """The user's own error inside Hydra's ``InstantiationException`` wrappers."""
    seen = set()
    while type(err).__name__ == "InstantiationException" and err.__cause__ is not None \
            and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def one_line(text: str) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space)."""
    return re.sub(r"\s+", " ", str(text)).strip()


def _out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, RuntimeError) and (
        type(err).__name__ == "OutOfMemoryError" or "out of memory" in text
        or "can't allocate memory" in text or "not enough memory" in text)


def _hydra_message(err: BaseException) -> str | None:
    """One sentence for Hydra's and OmegaConf's composition errors (None for others)."""
    module = type(err).__module__ or ""
    if not module.startswith(("hydra", "omegaconf")):
        return None
    text = str(err)
    name = type(err).__name__
    found = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", text)
    if name == "MissingConfigException" and found:
        group, value = found.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], re.M)
        listed = f"; available: {', '.join(options)}" if options else ""
        return f"{group}={value} is not a config of the {group} group{listed}"
    found = re.search(r"Could not override '([^']+)'", text)
    if found:
        key = found.group(1)
        parent, _, leaf = key.rpartition(".")
        keys = config_keys(parent)
        listed = f"; the keys of {parent or 'the config'} are {', '.join(keys)}" if keys else ""
        return (f"{key} is not a config key (check the spelling){listed}; +{key}=... adds a key, "
                f"but only where the code takes it")
    if name == "MissingMandatoryValue":
        key = _full_key(err) or "a value"
        return f"{key} has no value (??? in its config); set it, e.g. {key}=..."
    if name == "OverrideParseException":
        return (f"an override does not parse ({text.splitlines()[0]}); write key=value, quoting "
                "values with spaces or commas (https://hydra.cc/docs/advanced/override_grammar/"
                "basic/)")
    if name.startswith("Interpolation"):
        key = _full_key(err)
        return f"{key + ': ' if key else ''}{text.splitlines()[0]}; check the ${{...}} in it"
    first = text.strip().splitlines()[0] if text.strip() else name
    key = _full_key(err)
    return f"{first}{f' ({key})' if key and key not in first else ''}"


def _full_key(err: BaseException) -> str | None:
    key = getattr(err, "full_key", None)
    if key:
        return str(key)
    found = re.search(r"full_key: (\S+)", str(err))
    return found.group(1) if found else None


def config_keys(parent: str, argv: list[str] | None = None) -> list[str]:
    """The keys of the config node ``parent`` (``estimator``) as composed with the group
    choices of ``argv`` (default: this command's), or ``[]`` where that cannot be done."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import DictConfig

    argv = sys.argv[1:] if argv is None else argv
    groups = [a.split(",")[0] for a in argv if re.fullmatch(r"[\w/]+=[\w.\-,]+", a)]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(resources.files("conf")), version_base="1.3"):
            node = compose("config", overrides=groups).get(parent) if parent else None
    except Exception:  # noqa: BLE001 - the list is a courtesy; the message stands without it
        return []
    finally:
        GlobalHydra.instance().clear()
    return sorted(k for k in node if k != "_target_") if isinstance(node, DictConfig) else []


@contextmanager
def boundary(prog: str) -> Iterator[None]:
    """Runs a command: a user error prints ``<prog>: error: <sentence>`` and exits 2; any
    other error propagates with its traceback. Hydra re-raises inside (``HYDRA_FULL_ERROR``)."""
    debug = debugging() or bool(os.environ.get("HYDRA_FULL_ERROR"))
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as err:
        message = None if debug else user_message(err)
        if message is None:
            raise
        report(prog, message)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def report(prog: str, message: str) -> None:
    """Prints ``<prog>: error: <message>`` on stderr."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
