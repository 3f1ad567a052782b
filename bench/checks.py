"""Validate first: the checks :func:`bench.stages.resolve` makes before any training or
ground truth, so a bad value fails in seconds with one sentence naming its key.

* :func:`check_run_settings`: no ``???`` left, and the top-level values typed and in range
  (``seed`` a non-negative integer, ``num_threads`` and ``memory_budget_mb`` positive or
  null, ``stage`` and ``device`` known, flags booleans, ``plugins`` a list of names);
* :func:`build`: a config node instantiated with Hydra's wrapper taken off, so the user
  reads the task's or estimator's own sentence (``estimator.damping must be ...``); a key
  the target does not take is refused with the list of the keys it does take;
* :func:`ground_truth_options`: the ``ground_truth:`` block, its keys and values;
* :func:`check_cache_dir`: ``cache_dir`` can be created and written and has free space for
  what the run will write.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bench.errors import DISK, unwrap, user_message
from bench.ground_truth import GroundTruthOptions
from estimators.options import (
    OptionError,
    choice,
    escape,
    flag,
    literal,
    natural,
    positive,
)
from tasks.base import resolve_device

STAGES = ("all", "ground_truth", "factors", "score", "merge")
FREE_FLOOR_BYTES = 64 * 2**20  # ground-truth shards, records, lock files: never less than this
MODEL_COPIES = 3  # a cached model holds its weights and up to two optimizer moments


def check_run_settings(cfg: DictConfig) -> None:
    """Refuses a top-level value of the wrong type or range, or a ``???`` never set."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        named = ", ".join(missing)
        raise OptionError(f"{escape(named)} {'has' if len(missing) == 1 else 'have'} no value "
                          f"(??? in the config); set {'it' if len(missing) == 1 else 'them'} "
                          f"on the command line, e.g. {escape(missing[0])}=...")
    natural("seed", cfg.seed)
    choice("stage", cfg.stage, STAGES)
    if not isinstance(cfg.device, str):
        raise OptionError(f"device must be cpu, cuda, cuda:<index> or auto, got "
                          f"{literal(cfg.device)}")
    resolve_device(cfg.device)
    positive("num_threads", cfg.num_threads, integer=True, allow_none=True)
    positive("memory_budget_mb", cfg.get("memory_budget_mb"), allow_none=True)
    if cfg.get("tf32") is not None:
        flag("tf32", cfg.tf32)
    for key in ("progress", "save_scores"):
        flag(key, cfg.get(key))
    plugins = cfg.get("plugins")
    if plugins is not None and (isinstance(plugins, str) or not all(
            isinstance(p, str) for p in plugins)):
        raise OptionError(f"plugins must be a list of module names such as [my_metrics], "
                          f"got {literal(plugins)}")
    skip = cfg.get("skip")
    if skip is not None and not isinstance(skip, DictConfig):
        raise OptionError(f"skip must be a mapping {{{{task/estimator: reason}}}} or {{null}}, "
                          f"got {literal(skip)}")
    pairs = cfg.get("pair_settings")
    if pairs is not None and (not isinstance(pairs, DictConfig) or not all(
            isinstance(v, DictConfig) for v in pairs.values())):
        raise OptionError("pair_settings must be a mapping {{task/estimator: {{estimator "
                          f"key: value}}}}}}}} or {{null}}, got {literal(pairs)}")


def ground_truth_options(block: DictConfig | dict | None) -> GroundTruthOptions:
    """The ``ground_truth:`` block as validated options (an unknown key is refused)."""
    settings = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) \
        else dict(block or {})
    known = [f.name for f in dataclasses.fields(GroundTruthOptions)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise OptionError(f"ground_truth.{escape(unknown[0])} is not a setting; the settings "
                          f"of ground_truth are {', '.join(known)}")
    return GroundTruthOptions(**settings)


def build(node: DictConfig, where: str, label: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)`` with Hydra's wrapper taken off: the user's own error
    (its keys prefixed ``where.``), or one sentence for a key the target does not take or a
    ``_target_`` that cannot be imported.

    Args:
        where: the config key of the node (``task``, ``estimator``).
        label: its name for messages (the chosen config, ``ekfac``).
    """
    try:
        return instantiate(node, **kwargs)
    except Exception as err:
        cause = unwrap(err)
        if isinstance(cause, OptionError):
            if cause.scope is None:
                cause.scope = where
            raise cause from None
        target = node.get("_target_")
        found = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if isinstance(cause, TypeError) and found:
            key = found.group(1)
            keys = accepted_keys(target) or sorted(k for k in node if k != "_target_")
            raise OptionError(f"{where}.{key} is not a setting of {where}={label}; its "
                              f"settings are {', '.join(k for k in keys if k != key)} (check "
                              "the spelling)") from None
        if cause is not err and "Error locating target" in str(err):
            raise OptionError(f"{where}._target_={escape(target)} cannot be imported "
                              f"({escape(cause)}); check the module path, or install the "
                              "package that provides it") from None
        if cause is not err and user_message(cause) is not None:
            raise cause from None
        raise


def accepted_keys(target: str | None) -> list[str]:
    """The keyword arguments a ``_target_`` class takes, following ``**kwargs`` forwarded to
    its base classes; ``[]`` where that cannot be told."""
    try:
        from hydra.utils import get_class

        cls = get_class(target)
    except Exception:  # noqa: BLE001 - only for the message
        return []
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.name != "self"
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return sorted(names)


def expected_write_bytes(task: Any, seed: int, n_scores: int, model_cached: bool) -> int:
    """About how many bytes a run writes under ``cache_dir``: the attributed model with its
    checkpoints (sized on the meta device, nothing allocated; unknown sizes count 0), the
    scores and a floor for shards, records and locks."""
    model_bytes = 0
    if not model_cached:
        try:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                model = task.build_model(seed)
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        except Exception:  # noqa: BLE001 - an estimate; the writers still report a full disk
            model_bytes = 0
    return MODEL_COPIES * model_bytes + 4 * n_scores + FREE_FLOOR_BYTES


def check_cache_dir(cache_dir: str | Path, needed: int) -> Path:
    """``cache_dir`` created if missing, checked writable and with ``needed`` bytes free.

    Returns:
        the directory.
    """
    path = Path(str(cache_dir)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        why = DISK.get(err.errno, err.strerror or type(err).__name__)
        raise OptionError(f"cache_dir={escape(path)} cannot be written ({escape(why)}); set "
                          "cache_dir (or TDA_BENCH_CACHE) to a directory you can write") from None
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OptionError(f"cache_dir={escape(path)} has {size(free)} free, but this run may "
                          f"write about {size(needed)} (the model with its "
                          "checkpoints, ground truth, scores); free some space or set "
                          "cache_dir to another disk")
    return path


def size(n: int) -> str:
    """``n`` bytes for a person: ``256 KiB``, ``64 MiB``, ``3.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n // scale} {unit}"
    return f"{n} bytes"
