"""The model stage: the attributed model of a task and seed, trained once and cached.

Its cache key hashes what determines it: the task's name, its config without any ground
truth's settings (so changing ``task.lds`` never retrains the attributed model), the task
class and ``VERSION``, and the seed. A model the task does not train (``hf_lm``) is loaded
from its files every run (no copy in the cache, nothing logged as training) and keyed by
their content instead of the config (:meth:`~tasks.base.Task.identity`: a streamed hash of
the config and weight files, and of the encoded training data). The key is also the
problem's ``key`` for the estimators' factor and gradient caches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.cache import cache_lock, content_hash, load_checked, save_atomic
from bench.truths import without_truth_settings  # the package: built-in kinds registered
from estimators.problem import Checkpoint
from tasks.base import Task

log = logging.getLogger("tda-bench")


def task_config(cfg: DictConfig) -> dict[str, Any]:
    """The task's resolved config."""
    return OmegaConf.to_container(cfg.task, resolve=True)


def model_key(task: Task, cfg: DictConfig, seed: int | None = None) -> str:
    """The cache key of the attributed model for ``seed`` (default ``cfg.seed``); for a task
    whose model is given, a hash of its content (:meth:`~tasks.base.Task.identity`), never
    its path."""
    seed = cfg.seed if seed is None else int(seed)
    content = task.identity()
    identity = {"task": cfg.task_name, "version": task.VERSION, "class": type(task).__qualname__,
                "seed": seed, "what": "model"}
    if content is not None:
        identity["content"] = content
    else:
        identity["config"] = without_truth_settings(task_config(cfg))
    return content_hash(identity)


def trained_model(task: Task, cfg: DictConfig, cache_dir: Path,
                  seed: int | None = None) -> tuple[nn.Module, list[Checkpoint]]:
    """The attributed model for ``seed`` (default ``cfg.seed``) and its checkpoints: from the
    cache, or trained and cached (concurrent jobs of a sweep train each model once)."""
    seed = cfg.seed if seed is None else int(seed)
    if not task.trains:  # a given model: loaded from its own files, nothing to train or cache
        model = task.build_model(seed)
        log.info("Loaded the given %s model (content key %s)", cfg.task_name,
                 model_key(task, cfg, seed))
        return model, task.fit(model, seed=seed)
    key = model_key(task, cfg, seed)
    path = Path(cache_dir) / "models" / cfg.task_name / f"{key}.pt"
    model = task.build_model(seed)
    slot = {"seed": seed}  # what the file holds (its key hashes the rest)
    payload = load_checked(path, key, slot)
    if payload is None:
        with cache_lock(path):
            payload = load_checked(path, key, slot)
            if payload is None:
                log.info("Training %s (seed %d)", cfg.task_name, seed)
                checkpoints = task.fit(model, seed=seed, progress=cfg.progress)
                save_atomic({"key": key, "checkpoints": [vars(c) for c in checkpoints]}, path,
                            slot)
    if payload is not None:
        log.info("Loaded trained %s (seed %d) from %s", cfg.task_name, seed, path)
        checkpoints = [Checkpoint(**c) for c in payload["checkpoints"]]
    model.load_state_dict(checkpoints[-1].state_dict)
    return model, checkpoints
