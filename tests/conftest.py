"""Shared fixtures: a compose-once config factory with ``logger=none`` and a ``tmp_path``
cache, tiny task sizes, and a tiny attribution problem built without the harness."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from bench.cli import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Overrides that shrink each task so a whole run takes a few seconds.
TINY = {
    "digits_mlp": ["task.n_train=120", "task.n_queries=12", "task.epochs=3",
                   "task.lds.subsets=8", "task.lds.seeds=1", "task.pbrf.n=4"],
    "digits_mlp_noisy": ["task.n_train=120", "task.n_queries=12", "task.epochs=3",
                         "task.lds.subsets=8", "task.lds.seeds=1"],
    "digits_logreg": ["task.n_train=120", "task.n_queries=12", "task.lds.subsets=8",
                      "task.loo.n=10", "task.pbrf.n=4"],
    "facts": ["task.world.n_entities=12", "task.world.n_prior_docs=4", "task.world.n_queries=6",
              "task.model.layers=1", "task.model.width=32", "task.model.heads=2",
              "task.model.intermediate=64", "task.train.epochs=2", "num_threads=1",
              "fact_metrics.k=3"],
}


def compose_config(overrides: list[str], tmp_path) -> object:
    """A composed run config with HydraConfig set, as ``@hydra.main`` would have it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    """``make_cfg(task, *overrides)``: a tiny config for ``task`` writing under ``tmp_path``."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))

    def make(task: str = "digits_mlp", *overrides: str, tiny: bool = True):
        base = [f"task={task}", "logger=none", f"cache_dir={tmp_path / 'cache'}",
                "progress=false", *(TINY.get(task, []) if tiny else [])]
        return compose_config([*base, *overrides], tmp_path)

    yield make
    GlobalHydra.instance().clear()


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


@pytest.fixture(scope="session")
def tiny_mlp():
    """``(problem, task)``: a trained float64 digits MLP (60 train, 6 queries, hidden 8)."""
    task = float64_digits_mlp(n_train=60, n_queries=6, hidden=[8], epochs=5, batch_size=16)
    model = task.build_model(0)
    checkpoints = task.fit(model, seed=0)
    return task.problem(model, checkpoints), task
