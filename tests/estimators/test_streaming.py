"""Streamed scoring: a memory budget sets the chunk size; chunking never changes scores."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from bench.cli import run
from estimators import memory
from estimators.base import GradientEstimator
from estimators.grad_cos import GradCos
from estimators.grad_dot import GradDot
from estimators.memory import Budget


def test_budget_sets_chunk_size_from_the_memory_model(tiny_mlp):
    problem, _ = tiny_mlp
    estimator = GradDot(chunk_size=256)
    plan = estimator.plan_memory(problem, Budget(1e6))
    assert plan.chunk_size == 256  # never raised: the config value is the most
    fixed = sum(plan.fixed.values())
    tight = Budget((fixed + 7.5 * plan.per_example) / 2**20)
    assert GradDot(chunk_size=256).plan_memory(problem, tight).chunk_size == 7
    with pytest.raises(ValueError, match="before its first batch .*model.*memory_budget_mb"):
        GradDot().plan_memory(problem, Budget(plan.fixed["model"] / 2**21))
    with pytest.raises(ValueError, match="memory_budget_mb must be positive"):
        memory.budget(0)


@pytest.mark.parametrize("cls", [GradDot, GradCos])
def test_scores_do_not_depend_on_chunking(tiny_mlp, cls):
    problem, _ = tiny_mlp
    whole = cls(chunk_size=256).score(problem)
    chunked = cls(chunk_size=7).score(problem)
    assert whole.shape == (problem.n_queries, problem.n_train)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_run_honours_memory_budget(make_cfg, monkeypatch):
    plans = []
    plan = GradientEstimator.plan_memory

    def recorded(self, problem, budget=None):
        plans.append(plan(self, problem, budget))
        return plans[-1]

    monkeypatch.setattr(GradientEstimator, "plan_memory", recorded)
    plain = run(make_cfg("digits_mlp", "estimator=grad_dot"))
    assert plans[-1].chunk_size == 256  # the default budget keeps the configured chunk size
    budget = run(make_cfg("digits_mlp", "estimator=grad_dot", "memory_budget_mb=0.5"))
    assert budget["memory_budget_mb"] == 0.5 and plans[-1].chunk_size < 120
    assert plain["memory_budget_mb"] > 100
    assert budget["lds"] == pytest.approx(plain["lds"], abs=1e-6)


@pytest.mark.slow
def test_scoring_peak_memory_is_flat_in_n_train():
    """Fresh processes at n and 4n, where [n_train, P] gradients take 1.1 and 4.4 GB."""
    from studies.perf.score_memory import forwarded

    args = argparse.Namespace(d_in=512, width=1024, n_queries=8, chunk_size=64,
                              estimator="grad_dot", threads=1, memory_budget_mb=0.0)
    peaks = []
    for n in (512, 2048):
        out = subprocess.run([sys.executable, "-m", "studies.perf.score_memory", "--child",
                              str(n), *forwarded(args)], capture_output=True, text=True,
                             check=True).stdout
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_above_baseline_mb"])
    assert peaks[1] < 1.1 * peaks[0]
    assert peaks[1] < 0.25 * 4.4e9 / 2**20  # far below the full gradient matrix
