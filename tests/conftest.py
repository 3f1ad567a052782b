"""Fixtures: a tiny run config (composed once per session, copied per test with its own
``tmp_path`` cache and ``logger=none``) and a tiny trained attribution problem.

Helpers (``TINY``, ``float64_digits_mlp``, ``cli``, ...) live in :mod:`tests.helpers`.
"""

from __future__ import annotations

import os

import pytest
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import TINY, compose_config, float64_digits_mlp

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    """``make_cfg(task, *overrides)``: a tiny config for ``task`` writing under ``tmp_path``."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))

    def make(task: str = "digits_mlp", *overrides: str, tiny: bool = True):
        base = [f"task={task}", "logger=none", "progress=false",
                *(TINY.get(task, []) if tiny else [])]
        return compose_config([*base, *overrides], tmp_path, cache_dir=tmp_path / "cache")

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_mlp():
    """``(problem, task)``: a trained float64 digits MLP (60 train, 6 queries, hidden 8)."""
    task = float64_digits_mlp(n_train=60, n_queries=6, hidden=[8], epochs=5, batch_size=16)
    model = task.build_model(0)
    checkpoints = task.fit(model, seed=0)
    return task.problem(model, checkpoints), task
