"""Counterfactual proponent removal: retrain without each query's top proponents.

The proponent-removal test of Grosse et al. 2023 (§5.3, "Influence functions ... counterfactual
removal"), bergson's "query loss difference": for each tested query q, remove the ``k`` training
examples S_q the estimator ranks highest (the proponents: highest score, DESIGN.md's sign
convention), retrain with K seeds and measure how much f(z_q) drops, paired by seed:

    drop_q = (1/K) Σ_k [ f_q(θ_full,k) − f_q(θ_{−S_q},k) ]

where θ_full,k is the full-data model retrained with the same seed k (seeds
``ground_truth.RETRAIN_SEED_BASE + k``, the task's own ``fit``, so the same training code and
hyperparameters as the attributed model, never its seed). A good ranking gives a large
positive drop. The baseline removes ``k`` random training examples per query (one seeded
set per query): ``removal_drop_random``.

``k = max(1, round(fraction · n_train))``; the tested queries are the first ``n_queries``.

Two retraining plans of the shared ground-truth machinery (:mod:`bench.ground_truth`: units,
shards, locks, atomic cache files):

* ``removal_random``: the K full-data models and the n_queries × K random-removal models.
  They do not depend on the estimator, so every estimator of a task shares them.
* ``removal``: the n_queries × K proponent-removal models, keyed by a hash of the removed
  index sets (the estimator's ranking): rerunning the same estimator and seed retrains
  nothing, a different ranking retrains.

A unit is (removed set s, seed k) = ``divmod(unit, K)``. Where the task vectorises retraining
(:meth:`~tasks.base.Task.fit_many`, e.g. the digits tasks), a shard's models of equal
training-set size train in one ensemble pass; otherwise they are fitted one by one with
``task.fit`` (costly for language-model tasks such as ``facts``: ~40 s or more per model, and
a run retrains (2·n_queries + 1)·K of them the first time).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench import ground_truth as gt
from bench.cache import content_hash
from bench.metrics import mean_sem
from tasks.base import Task

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or meaning of removal files changes
NOT_TRAINING = ("checkpoints", "lds", "loo", "pbrf")  # task config keys left out of the key


@dataclass(frozen=True)
class RemovalOptions:
    """The ``removal`` config block.

    Args:
        enabled: run the test after scoring (off by default: it retrains models).
        fraction: share of the training set removed per query (at least one example).
        seeds: K retraining seeds; each removal model is paired with the full-data model
            of the same seed.
        n_queries: the first ``n_queries`` queries are tested (None: all).
        random_seed: the generator of the random-removal baseline's sets.
    """

    enabled: bool = False
    fraction: float = 0.01
    seeds: int = 3
    n_queries: int | None = 10
    random_seed: int = 0

    def __post_init__(self):
        if not 0.0 < float(self.fraction) < 1.0:
            raise ValueError(f"removal.fraction must be in (0, 1), got {self.fraction}")
        if int(self.seeds) < 1:
            raise ValueError(f"removal.seeds must be at least 1, got {self.seeds}")
        if self.n_queries is not None and int(self.n_queries) < 1:
            raise ValueError(f"removal.n_queries must be at least 1 or null, got "
                             f"{self.n_queries}")

    def size(self, n_train: int) -> int:
        """k: training examples removed per query."""
        return max(1, int(round(float(self.fraction) * n_train)))

    def queries(self, n_queries: int) -> Tensor:
        """``[Q']``: the tested queries (the first ``n_queries``)."""
        n = n_queries if self.n_queries is None else min(int(self.n_queries), n_queries)
        return torch.arange(n)


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


def plan(task: Task, task_name: str, task_cfg: dict, kind: str, removed: Tensor,
         spec: dict) -> gt.Plan:
    """A removal plan: retrain without each row of ``removed`` ``[S, k]`` under K seeds.

    Args:
        kind: ``removal`` (proponent sets) or ``removal_random`` (the full-data models
            first, as set 0, then the random sets).
        spec: the settings that determine the models (``seeds`` K, ``k``, ...).
    """
    full_first = kind == "removal_random"
    # Neither the other ground truths' settings nor recorded checkpoints change retraining.
    task_cfg = {k: v for k, v in task_cfg.items() if k not in NOT_TRAINING}
    spec = {**spec, "full_first": full_first}
    identity = {"task": task_name, "config": task_cfg, "class": type(task).__qualname__,
                "version": task.VERSION, "kind": kind, "spec": spec, "format": FORMAT,
                "removed": content_hash(removed), "retrain_seed_base": gt.RETRAIN_SEED_BASE}
    n_sets = len(removed) + int(full_first)
    return gt.Plan(task_name, kind, content_hash(identity), spec,
                   list(range(n_sets * int(spec["seeds"]))), {"removed": removed})


def _unit(task: Task, plan: gt.Plan, unit: int) -> tuple[int, Tensor]:
    """The retraining seed and the kept training indices ``[n − k]`` of one unit."""
    s, k = divmod(unit, int(plan.spec["seeds"]))
    keep = torch.ones(task.n_train, dtype=torch.bool)
    if plan.spec["full_first"]:
        s -= 1
    if s >= 0:
        keep[plan.meta["removed"][s]] = False
    return gt.RETRAIN_SEED_BASE + k, keep.nonzero().flatten()


def retraining(task: Task, plan: gt.Plan, vectorise: bool = True) -> gt.Work:
    """The work of removal shards: ``values [U, n_queries]``, the measurement of every query
    under each unit's retrained model (:func:`bench.ground_truth.fit_and_measure`)."""

    def work(units: list[int], desc: str) -> dict[str, Tensor]:
        values = gt.fit_and_measure(task, [_unit(task, plan, u) for u in units], vectorise, desc)
        return {"values": torch.stack(values) if values else torch.zeros(0)}

    return work


def paired_drops(full: Tensor, removed: Tensor, queries: Tensor) -> Tensor:
    """``[Q']``: drop_q = mean_k [f_q(θ_full,k) − f_q(θ_{−S_q},k)].

    Args:
        full: ``[K, n_queries]`` measurements of the full-data models.
        removed: ``[Q', K, n_queries]``: row i holds the models without query i's set.
        queries: ``[Q']`` which query each row of ``removed`` tests.
    """
    f_removed = removed[torch.arange(len(queries)), :, queries]  # [Q', K]
    return (full[:, queries].T - f_removed).mean(dim=1)


def compute(task: Task, task_name: str, task_cfg: dict, scores: Tensor,
            settings: RemovalOptions, cache_dir: Path,
            options: gt.GroundTruthOptions) -> dict[str, Tensor]:
    """Retrains (or loads) every removal model of a ranking.

    Args:
        scores: ``[n_queries, n_train]`` the estimator's scores.
        options: ground-truth options (threads, vectorise); removal always runs as one shard
            in this process, because it depends on the scores.

    Returns:
        ``queries [Q']``, ``proponents [Q', k]``, ``random [Q', k]``, ``drop [Q']``,
        ``drop_random [Q']``.
    """
    queries = settings.queries(scores.shape[0])
    k, seeds = settings.size(task.n_train), int(settings.seeds)
    if k == 0 or k >= task.n_train:
        raise ValueError(f"removal.fraction={settings.fraction} removes {k} of {task.n_train} "
                         "training examples; choose a fraction that keeps some.")
    proponents = top_proponents(scores, queries, k)
    randoms = random_sets(task.n_train, len(queries), k, settings.random_seed)
    options = dataclasses.replace(options, shard=0, num_shards=1, on_missing="compute")
    base = {"seeds": seeds, "k": k, "queries": queries.tolist()}
    plans = {"removal_random": plan(task, task_name, task_cfg, "removal_random", randoms,
                                    {**base, "random_seed": int(settings.random_seed)}),
             "removal": plan(task, task_name, task_cfg, "removal", proponents, base)}
    values = {kind: gt.load_or_compute(retraining(task, p, options.vectorise), p,
                                       Path(cache_dir), options)["values"]
              for kind, p in plans.items()}
    n_q = values["removal"].shape[-1]
    baseline = values["removal_random"].view(-1, seeds, n_q)  # [1 + Q', K, n_queries]
    full = baseline[0]
    return {"queries": queries, "proponents": proponents, "random": randoms,
            "drop": paired_drops(full, values["removal"].view(-1, seeds, n_q), queries),
            "drop_random": paired_drops(full, baseline[1:], queries)}


def removal_metrics(task: Task, task_name: str, task_cfg: dict, scores: Tensor,
                    settings: RemovalOptions, cache_dir: Path,
                    options: gt.GroundTruthOptions) -> tuple[dict, dict]:
    """The run's removal metrics and per-query columns (NaN for untested queries).

    Returns:
        ``({removal_drop, removal_drop_sem, removal_drop_random, removal_drop_random_sem,
        removal_k, removal_queries, removal_seconds}, {removal_drop: [n_queries],
        removal_drop_random: [n_queries]})``.
    """
    start = time.perf_counter()
    found = compute(task, task_name, task_cfg, scores, settings, cache_dir, options)
    metrics: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    for name in ("drop", "drop_random"):
        values = found[name].double().numpy()
        metrics[f"removal_{name}"], metrics[f"removal_{name}_sem"] = mean_sem(values)
        column = np.full(scores.shape[0], np.nan)
        column[found["queries"].numpy()] = values
        per_query[f"removal_{name}"] = column
    metrics.update(removal_k=float(found["proponents"].shape[1]),
                   removal_queries=float(len(found["queries"])),
                   removal_seconds=time.perf_counter() - start)
    return metrics, per_query
