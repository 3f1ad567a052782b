"""The estimators by their config names: ``conf/estimator/<name>.yaml`` from Python.

The config group is the registry (docs/design.md): :func:`estimator` composes the YAML of
``name`` through Hydra's compose API — its ``defaults:`` blocks (``base/gradient``, ...)
merged exactly as the command line merges them — and instantiates its ``_target_`` with the
YAML's values and the caller's overrides. No name is listed here; a YAML added to the group
(or found on ``searchpath``) is an estimator at once.

Two keys of the YAMLs come from the run rather than the estimator: ``${seed}`` takes the
``seed`` argument, and the keys derived from the run's ``${cache_dir}`` (``cache_dir`` of
kfac/ekfac, ``index_dir``) are off (None: nothing is written to disk) unless ``cache_dir``
is given; keys derived from Hydra's run folder (a peer's ``scratch_dir``) are None (a
temporary folder).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from estimators.base import Estimator

CONF_DIR = str(resources.files("conf"))
GROUP = "estimator"


@contextmanager
def _hydra() -> Iterator[None]:
    """Hydra initialised on the project's configs for the block; a Hydra the caller had
    initialised (an app, a test) is restored afterwards."""
    previous = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            yield
    finally:  # initialize_config_dir swaps the singleton back: restore on the current one
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def _searchpath_override(searchpath: tuple[str, ...]) -> list[str]:
    if not searchpath:
        return []
    paths = [p if "://" in p else f"file://{p}" for p in searchpath]
    return [f"hydra.searchpath=[{','.join(paths)}]"]


@functools.cache
def _names() -> tuple[str, ...]:
    with _hydra():
        return tuple(GlobalHydra.instance().config_loader().get_group_options(GROUP))


def estimator_names() -> list[str]:
    """Every estimator config name of the project (``ekfac``, ``explicit``, ...), from the
    config group."""
    return list(_names())


@functools.cache
def _composed(name: str, searchpath: tuple[str, ...]) -> DictConfig:
    """The composed, unresolved config of ``estimator=name`` (composed once per name)."""
    if not searchpath and name not in _names():
        raise ValueError(f"unknown estimator {name!r}; the estimators are: "
                         f"{', '.join(_names())}.")
    with _hydra():
        try:
            cfg = compose("config", overrides=[f"{GROUP}={name}", "logger=none",
                                               *_searchpath_override(searchpath)])
        except Exception as error:  # Hydra's MissingConfigException lists the options
            raise ValueError(f"unknown estimator {name!r}: {str(error).splitlines()[0]}") \
                from None
    return cfg


def estimator_config(name: str, *, seed: int = 0, cache_dir: str | None = None,
                     searchpath: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML values of estimator ``name`` (``_target_`` included), resolved for ``seed``
    and ``cache_dir`` (see the module docstring)."""
    cfg = _composed(str(name), tuple(map(str, searchpath))).copy()
    node = cfg[GROUP]
    for key in list(node):
        if not OmegaConf.is_interpolation(node, key):
            continue
        value = str(node._get_node(key)._value())
        # Outside a Hydra run there is no run folder: a peer's scratch_dir is a temporary one.
        if "hydra:" in value or (cache_dir is None and "cache_dir" in value):
            node[key] = None
    cfg.seed = int(seed)
    cfg.cache_dir = None if cache_dir is None else str(cache_dir)
    return OmegaConf.to_container(node, resolve=True)


def estimator_class(name: str, searchpath: Sequence[str] = ()) -> type[Estimator]:
    """The class of estimator ``name`` (its YAML's ``_target_``)."""
    return get_class(estimator_config(name, searchpath=searchpath)["_target_"])


def estimator(name: str, *, seed: int = 0, cache_dir: str | None = None,
              searchpath: Sequence[str] = (), **overrides: Any) -> Estimator:
    """Estimator ``name`` with its YAML's defaults and ``overrides``, e.g.
    ``estimator("ekfac", damping=1e-3)``.

    Args:
        name: the config name (``conf/estimator/<name>.yaml``, or a YAML under an
            ``estimator/`` folder of a ``searchpath`` directory).
        seed: the value of the YAML's ``${seed}`` keys (sampling, projections).
        cache_dir: where fitted factors and gradient indexes are cached (None: nowhere).
        searchpath: more config directories (as ``hydra.searchpath``), for your own YAMLs.
        **overrides: keys of the YAML to change.

    Returns:
        the instantiated, validated estimator; ``fit(problem)`` then ``score(problem)``.
    """
    config = estimator_config(name, seed=seed, cache_dir=cache_dir, searchpath=searchpath)
    target = config.pop("_target_")
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"estimator {name!r} has no argument {', '.join(unknown)}; its "
                         f"arguments are: {', '.join(sorted(config))}.")
    return get_class(target)(**{**config, **overrides})
