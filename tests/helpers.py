"""Helpers shared by the tests: tiny task sizes, config composition, a float64 digits MLP,
the command line, and run records as the harness writes them.

Tests import these from ``tests.helpers``; ``conftest.py`` holds only fixtures.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from bench.cli import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def generated_images(path: Path, n_train: int = 60, n_test: int = 12, size: int = 16,
                     n_classes: int = 3, seed: int = 0) -> Path:
    """Writes an ``.npz`` of generated RGB images (``x_train [n, size, size, 3]`` uint8,
    ``y_train``, ``x_test``, ``y_test``): class c brightens band c of the rows, plus noise, so
    a CNN learns it in a few epochs. Written atomically; an existing file is kept."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % n_classes
        x = rng.normal(96, 30, (n, size, size, 3))
        band = size // n_classes
        for i, c in enumerate(y):
            x[i, c * band:(c + 1) * band, :, c % 3] += 100
        return np.clip(x, 0, 255).astype(np.uint8), y

    (x_train, y_train), (x_test, y_test) = draw(n_train), draw(n_test)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    os.replace(tmp, path)
    return path


TINY_IMAGES = generated_images(Path(tempfile.gettempdir()) / "tda-bench-tests" / "images-v1.npz")

# Overrides that shrink each task so a whole run takes a few seconds.
TINY = {
    "digits_mlp": ["task.n_train=120", "task.n_queries=12", "task.epochs=3",
                   "task.lds.subsets=8", "task.lds.seeds=1", "task.pbrf.n=4"],
    "digits_mlp_noisy": ["task.n_train=120", "task.n_queries=12", "task.epochs=3",
                         "task.lds.subsets=8", "task.lds.seeds=1", "task.pbrf.n=4"],
    "digits_logreg": ["task.n_train=120", "task.n_queries=12", "task.lds.subsets=8",
                      "task.loo.n=10", "task.pbrf.n=4"],
    "digits_cnn": ["task.n_train=120", "task.n_queries=12", "task.epochs=3",
                   "task.lds.subsets=8", "task.pbrf.n=4"],
    "regression": ["task.n_train=80", "task.n_queries=10", "task.epochs=10",
                   "task.lds.subsets=8", "task.pbrf.n=4"],
    "regression_linear": ["task.n_train=80", "task.n_queries=10", "task.lds.subsets=8",
                          "task.loo.n=10", "task.pbrf.n=4"],
    "images": [f"task.data={TINY_IMAGES}", "task.n_train=40", "task.n_queries=8",
               "task.model=small_cnn", "task.channels=[4,8]", "task.batch_size=16",
               "task.epochs=3", "task.lds.subsets=8"],
    "facts": ["task.world.n_entities=12", "task.world.n_prior_docs=4", "task.world.n_queries=6",
              "task.model.layers=1", "task.model.width=32", "task.model.heads=2",
              "task.model.intermediate=64", "task.train.epochs=2", "num_threads=1",
              "fact_metrics.k=3"],
}
TINY["facts_lds"] = [*TINY["facts"], "task.lds.subsets=4"]

# Overrides that cut the iterative estimators short where a test only checks that a run
# goes through (their defaults are 2,000 LiSSA steps and 400 Arnoldi iterations).
SHORT = {"lissa": ["estimator.depth=3", "estimator.power_iterations=2"],
         "arnoldi": ["estimator.iterations=4", "estimator.rank=2"]}


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """The composed config of ``overrides`` (with Hydra's own config), composed once per
    session; callers get copies."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def compose_config(overrides: list[str], tmp_path: Path, cache_dir: Path | None = None):
    """A run config with HydraConfig set, as ``@hydra.main`` would have it: a copy of the
    session's composition of ``overrides`` writing its run folder under ``tmp_path`` (and
    its cache under ``cache_dir``, when given)."""
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.num = 0
        if cache_dir is not None and not any(o.startswith("cache_dir=") for o in overrides):
            cfg.cache_dir = str(cache_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def float64_digits_mlp(**kwargs):
    """A :class:`~tasks.digits_mlp.DigitsMLP` whose data, model and training are float64
    (for closed-form comparisons); ``kwargs`` are the task's arguments."""
    from tasks.digits_mlp import DigitsMLP

    class DigitsMLP64(DigitsMLP):
        dtype = torch.float64
        precision = "64-true"

        def build_model(self, seed):
            return super().build_model(seed).double()

    return DigitsMLP64(**kwargs)


def cli(*args: str, cwd: Path = REPO, env_extra: dict | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m bench ARGS`` in a subprocess (W&B offline)."""
    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_run(root, task, estimator, seed, lds, *, seconds=1.0, extra=None, command=None,
              scores=None):
    """A run directory with ``metrics.json`` and ``per_query.csv`` as bench.record writes."""
    out = root / f"{task}_{estimator}_seed{seed}".replace("[", "_").replace("]", "_")
    out.mkdir(parents=True)
    lds = np.asarray(lds, dtype=float)
    record = {"task": task, "estimator": estimator.split("[")[0], "seed": seed,
              "lds": float(np.nanmean(lds)), "fit_seconds": seconds / 2,
              "score_seconds": seconds / 2, "peak_rss_mb": 100.0 + seed,
              "command": command or f"tda-bench task={task} estimator={estimator} seed={seed}",
              "date": f"2026-01-0{seed + 1}T00:00:00+00:00", "commit": "abc",
              "versions": {"torch": "2.13.0"}, **(extra or {})}
    (out / "metrics.json").write_text(json.dumps(record))
    pd.DataFrame({"query": np.arange(lds.size), "lds": lds}).to_csv(out / "per_query.csv",
                                                                    index=False)
    if scores is not None:
        torch.save(scores, out / "scores.pt")
    return out


def ground_truth_of(cfg, kind: str):
    """``(ctx, kind, plan)``: one ground-truth kind of the run ``cfg`` as the harness
    resolves it (the attributed model trained first where the kind needs it)."""
    from bench import stages

    job = stages.resolve(cfg)
    truth = job.kinds[kind]
    if truth.needs != "task":
        stages.model(job)
    return job.ctx, truth, truth.plan(job.ctx)
