"""Counterfactual proponent removal: retrain without each query's top proponents.

The proponent-removal test of Grosse et al. 2023 (§5.3, "Influence functions ... counterfactual
removal"), bergson's "query loss difference": for each tested query q, remove the ``k`` training
examples S_q the estimator ranks highest (the proponents: highest score, DESIGN.md's sign
convention), retrain with K seeds and measure how much f(z_q) drops, paired by seed:

    drop_q = (1/K) Σ_k [ f_q(θ_full,k) − f_q(θ_{−S_q},k) ]

where θ_full,k is the full-data model retrained with the same seed k (seeds
``retraining.RETRAIN_SEED_BASE + k``, the task's own ``fit``, so the same training code and
hyperparameters as the attributed model, never its seed). A good ranking gives a large
positive drop. The baseline removes ``k`` random training examples per query (one seeded
set per query): ``removal_drop_random``.

``k = max(1, round(fraction · n_train))``; the tested queries are the first ``n_queries``.

A ``run`` kind that needs the scores (configured by the top-level ``removal:`` block,
off unless ``enabled``), with two retraining plans through the driver
(:mod:`bench.ground_truth`: units, shards, locks, atomic cache files):

* ``removal_random``: the K full-data models and the n_queries × K random-removal models.
  They do not depend on the estimator, so every estimator of a task shares them.
* ``removal``: the n_queries × K proponent-removal models, keyed by a hash of the removed
  index sets (the estimator's ranking): rerunning the same estimator and seed retrains
  nothing, a different ranking retrains.

A unit is (removed set s, seed k) = ``divmod(unit, K)``. The metrics ``removal_drop`` and
``removal_drop_random`` read the per-query drops (:mod:`bench.metrics.removal`). Where the
task vectorises retraining (:meth:`~tasks.base.Task.fit_many`, e.g. the digits tasks), a
shard's models of equal training-set size train in one ensemble pass; otherwise they are
fitted one by one with ``task.fit`` (costly for language-model tasks such as ``facts``:
~40 s or more per model, and a run retrains (2·n_queries + 1)·K of them the first time).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor

from bench import ground_truth as driver
from bench.cache import content_hash
from bench.truths.base import GroundTruth, TruthContext, register_truth
from bench.truths.retraining import RETRAIN_SEED_BASE, check_retrainable, fit_and_measure, stacked
from estimators.options import bounded, flag, natural, positive
from tasks.base import Task


def top_proponents(scores: Tensor, queries: Tensor, k: int) -> Tensor:
    """The removal sets of a ranking: each query's ``k`` highest-scored training examples.

    Args:
        scores: ``[n_queries, n_train]``.
        queries: ``[Q']`` the tested queries.
        k: examples per set (0 gives empty sets).

    Returns:
        ``[Q', k]`` long, each row sorted ascending (a set; ties broken by lower index).
    """
    order = torch.argsort(scores[queries].double(), dim=1, descending=True, stable=True)
    return order[:, :k].sort(dim=1).values


def random_sets(n_train: int, n_sets: int, k: int, seed: int) -> Tensor:
    """``[n_sets, k]`` long: ``n_sets`` random sets of ``k`` training examples (one seeded
    generator, drawn in order), each row sorted ascending."""
    gen = torch.Generator().manual_seed(int(seed))
    rows = [torch.randperm(n_train, generator=gen)[:k] for _ in range(n_sets)]
    return torch.stack(rows).sort(dim=1).values if rows else torch.zeros(0, k, dtype=torch.long)


def paired_drops(full: Tensor, removed: Tensor, queries: Tensor) -> Tensor:
    """``[Q']``: drop_q = mean_k [f_q(θ_full,k) − f_q(θ_{−S_q},k)].

    Args:
        full: ``[K, n_queries]`` measurements of the full-data models.
        removed: ``[Q', K, n_queries]``: row i holds the models without query i's set.
        queries: ``[Q']`` which query each row of ``removed`` tests.
    """
    f_removed = removed[torch.arange(len(queries)), :, queries]  # [Q', K]
    return (full[:, queries].T - f_removed).mean(dim=1)


@register_truth
class Removal(GroundTruth):
    """Counterfactual proponent removal (see module docstring).

    Settings (``removal:``): ``enabled`` (off by default: it retrains models), ``fraction``
    of the training set removed per query (at least one example), ``seeds`` K (each removal
    model paired with the full-data model of the same seed), ``n_queries`` (the first ones
    are tested; None: all), ``random_seed`` (the random-removal baseline's sets).
    """

    name = "removal"
    scope = "run"
    needs = "scores"
    sharded = False
    defaults = {"enabled": False, "fraction": 0.01, "seeds": 3, "n_queries": 10,
                "random_seed": 0}

    def validate(self) -> None:
        flag("enabled", self.spec["enabled"])
        bounded("fraction", self.spec["fraction"], 0.0, 1.0, open_low=True, open_high=True)
        positive("seeds", self.spec["seeds"], integer=True)
        positive("n_queries", self.spec["n_queries"], integer=True, allow_none=True)
        natural("random_seed", self.spec["random_seed"])

    def check(self, task: Task) -> None:
        if self.spec["enabled"]:
            check_retrainable(task, "removal.enabled")

    def active(self, ctx: TruthContext) -> bool:
        return bool(self.spec["enabled"])

    def size(self, n_train: int) -> int:
        """k: training examples removed per query."""
        return max(1, int(round(float(self.spec["fraction"]) * n_train)))

    def queries(self, n_queries: int) -> Tensor:
        """``[Q']``: the tested queries (the first ``n_queries``)."""
        n = self.spec["n_queries"]
        return torch.arange(n_queries if n is None else min(int(n), n_queries))

    def removal_plan(self, ctx: TruthContext, kind: str, removed: Tensor,
                     spec: dict) -> driver.Plan:
        """Retrain without each row of ``removed`` ``[S, k]`` under K seeds; ``kind`` is
        ``removal`` (proponent sets) or ``removal_random`` (the full-data models first, as
        set 0, then the random sets)."""
        full_first = kind == "removal_random"
        spec = {**spec, "full_first": full_first}
        identity = {**self.identity(ctx), "kind": kind, "spec": spec, "removed": removed,
                    "retrain_seed_base": RETRAIN_SEED_BASE}
        n_sets = len(removed) + int(full_first)
        return driver.Plan(ctx.task_name, kind, content_hash(identity), spec,
                           list(range(n_sets * int(spec["seeds"]))), {"removed": removed})

    def compute(self, ctx: TruthContext, plan: driver.Plan, units: list[int],
                desc: str) -> dict[str, Tensor]:
        """``values [U, n_queries]``: every query's measurement under each unit's model."""
        jobs = []
        for unit in units:
            s, k = divmod(unit, int(plan.spec["seeds"]))
            keep = torch.ones(ctx.task.n_train, dtype=torch.bool)
            if plan.spec["full_first"]:
                s -= 1
            if s >= 0:
                keep[plan.meta["removed"][s]] = False
            jobs.append((RETRAIN_SEED_BASE + k, keep.nonzero().flatten()))
        return {"values": stacked(fit_and_measure(ctx.task, jobs, ctx.options.vectorise, desc))}

    def load(self, ctx: TruthContext) -> dict:
        """Retrains (or loads) every removal model of the estimator's ranking; always one
        shard in this process, because it depends on the scores.

        Returns:
            ``queries [Q']``, ``proponents [Q', k]``, ``random [Q', k]``, ``drop [Q']``,
            ``drop_random [Q']``, ``seconds``.
        """
        start = time.perf_counter()
        scores, task = ctx.scores, ctx.task
        queries = self.queries(scores.shape[0])
        k, seeds = self.size(task.n_train), int(self.spec["seeds"])
        if k >= task.n_train:
            raise ValueError(f"removal.fraction={self.spec['fraction']} removes {k} of "
                             f"{task.n_train} training examples; choose a fraction that keeps "
                             "some.")
        proponents = top_proponents(scores, queries, k)
        randoms = random_sets(task.n_train, len(queries), k, self.spec["random_seed"])
        options = dataclasses.replace(ctx.options, shard=0, num_shards=1, on_missing="compute")
        base = {"seeds": seeds, "k": k, "queries": queries.tolist()}
        plans = {"removal_random": self.removal_plan(
                     ctx, "removal_random", randoms,
                     {**base, "random_seed": int(self.spec["random_seed"])}),
                 "removal": self.removal_plan(ctx, "removal", proponents, base)}
        values = {kind: driver.load_or_compute(self.work(ctx, p), p, ctx.cache_dir,
                                               options).values
                  for kind, p in plans.items()}
        n_q = values["removal"].shape[-1]
        baseline = values["removal_random"].view(-1, seeds, n_q)  # [1 + Q', K, n_queries]
        full = baseline[0]
        return {"queries": queries, "proponents": proponents, "random": randoms,
                "drop": paired_drops(full, values["removal"].view(-1, seeds, n_q), queries),
                "drop_random": paired_drops(full, baseline[1:], queries),
                "seconds": time.perf_counter() - start}
