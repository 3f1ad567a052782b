"""Ground truth by retraining: leave-one-out (LOO) and the linear datamodeling score (LDS).

* ``loo`` (convex tasks): retrain without each of ``n`` training points drawn by a seeded
  generator, warm-started from the full-data optimum; effect = f(θ) − f(θ₋ₘ) per query.
* ``lds`` (Park et al. 2023): ``subsets`` random subsets of a ``fraction`` of the training
  set, each retrained with ``seeds`` seeds; the seed-averaged measurement per query.

Both use the task's own :meth:`~tasks.base.Task.fit`, so retrained models share every
hyperparameter with the attributed one. Ground truth depends only on the task config (never
on the run's ``seed`` or estimator): it is keyed by a hash of the task config, the
ground-truth settings and the task's ``VERSION``, and shared by every run of the task.

The work is a list of retraining *units* (one subset and seed, or one removed point); shard
``s`` of ``S`` takes units ``s, s+S, s+2S, ...`` and is written atomically as its own file,
so shards can run as separate jobs (SLURM arrays). A shard is computed under a lock, so two
jobs never compute the same shard at once; a job killed mid-shard leaves no shard file, and
the bytes of a shard file depend only on its content, so a rerun after a crash reproduces
the cache of an uninterrupted run byte for byte. Torch's thread count is fixed while
retraining so that every sharding gives the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.cache import (
    cache_lock,
    content_hash,
    load_checked,
    lock_path,
    save_atomic,
    sweep_stale_temp_files,
)
from tasks.base import Task

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or meaning of ground-truth files changes
RETRAIN_SEED_BASE = 10_000  # retraining seeds never coincide with attributed-model seeds


@dataclass(frozen=True)
class GroundTruthOptions:
    """How ground truth is computed (not *what*: that is the task config).

    Args:
        shard: which shard this process computes in ``stage=ground_truth``.
        num_shards: how many shards the work is split into.
        num_threads: torch threads while retraining (fixed, for reproducibility).
        vectorise: train a shard's LDS models as one vectorised ensemble where the task
            supports it (:meth:`~tasks.base.Task.fit_many`); the same models up to float
            rounding, so the cache key does not depend on it.
        on_missing: ``compute`` missing shards in this process, or ``error`` with the list
            and the command that computes them.
    """

    shard: int = 0
    num_shards: int = 1
    num_threads: int = 1
    on_missing: str = "compute"
    vectorise: bool = True

    def __post_init__(self):
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"ground_truth.shard must be in [0, {self.num_shards}), got "
                             f"{self.shard}")
        if self.on_missing not in ("compute", "error"):
            raise ValueError(f"ground_truth.on_missing must be 'compute' or 'error', got "
                             f"{self.on_missing!r}")


class GroundTruthMissing(RuntimeError):
    """Raised when shards are missing and ``on_missing=error``."""


@dataclass
class Plan:
    """What a ground truth retrains: its cache key, spec and units."""

    task_name: str
    kind: str
    key: str
    spec: dict[str, Any]
    units: list[int]
    meta: dict[str, torch.Tensor]

    def directory(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / "ground_truth" / self.task_name / f"{self.kind}-{self.key}"

    def shard_path(self, cache_dir: Path, shard: int, num_shards: int) -> Path:
        return self.directory(cache_dir) / f"shard-{shard:04d}-of-{num_shards:04d}.pt"


def plan(task: Task, task_name: str, task_cfg: dict, kind: str) -> Plan:
    """The retraining plan of one ground-truth ``kind`` of ``task``."""
    if kind not in task.ground_truths:
        raise ValueError(f"task {task_name} offers ground truth {task.ground_truths}, not {kind}")
    spec = dict(getattr(task, kind))
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    n = task.n_train
    if kind == "lds":
        spec = {"subsets": 50, "fraction": 0.5, "seeds": 1, "seed": 0, **spec}
        size = int(round(spec["fraction"] * n))
        masks = torch.zeros(spec["subsets"], n, dtype=torch.bool)
        for j in range(spec["subsets"]):
            masks[j, torch.randperm(n, generator=gen)[:size]] = True
        meta = {"masks": masks}
        units = list(range(spec["subsets"] * spec["seeds"]))
    else:
        spec = {"n": 50, "seed": 0, **spec}
        meta = {"indices": torch.randperm(n, generator=gen)[: spec["n"]]}
        units = list(range(spec["n"]))
    # Which intermediate checkpoints the attributed model records does not change retraining.
    task_cfg = {k: v for k, v in task_cfg.items() if k != "checkpoints"}
    identity = {"task": task_name, "config": task_cfg, "class": type(task).__qualname__,
                "version": task.VERSION, "kind": kind, "spec": spec, "format": FORMAT}
    return Plan(task_name, kind, content_hash(identity), spec, units, meta)


def fit_and_measure(task: Task, jobs: list[tuple[int, torch.Tensor]], vectorise: bool,
                    desc: str) -> list[torch.Tensor]:
    """The query measurements ``[n_queries]`` of a model retrained for each job.

    A job is (retraining seed, kept training indices). Jobs that keep equally many examples
    train together by :meth:`~tasks.base.Task.fit_many` where the task supports it and
    ``vectorise`` is on; the rest are fitted one by one with ``task.fit``. Either way the
    models are the same up to float rounding. Shared by LDS and :mod:`bench.removal`.
    """
    values: list[torch.Tensor | None] = [None] * len(jobs)
    if vectorise:
        for size in sorted({len(kept) for _, kept in jobs}, reverse=True):
            group = [i for i, (_, kept) in enumerate(jobs) if len(kept) == size]
            out = task.fit_many([jobs[i][0] for i in group], [jobs[i][1] for i in group])
            if out is None:  # the task cannot vectorise
                break
            for i, row in zip(group, out, strict=True):
                values[i] = row
    todo = [i for i, v in enumerate(values) if v is None]
    if len(todo) > 1:
        log.info("%s: retraining %d models one by one (%s).", desc, len(todo),
                 "the task does not vectorise" if vectorise else "ground_truth.vectorise=false")
    for i in tqdm(todo, desc=desc, disable=None):
        values[i] = _fit_one(task, *jobs[i])
    return values


def _fit_one(task: Task, seed: int, kept: torch.Tensor) -> torch.Tensor:
    """f ``[n_queries]`` of one model trained from ``seed`` on the ``kept`` examples."""
    model = task.build_model(seed)
    task.fit(model, seed=seed, indices=kept)
    return task.measure_queries(model)


def _lds_job(plan: Plan, unit: int) -> tuple[int, torch.Tensor]:
    """The retraining seed and kept indices of one LDS unit (subset, seed index)."""
    subset, k = divmod(unit, plan.spec["seeds"])
    return RETRAIN_SEED_BASE + k, plan.meta["masks"][subset].nonzero().flatten()


def _retrain_loo(task: Task, plan: Plan, unit: int, init: dict) -> torch.Tensor:
    """f ``[n_queries]`` of the model retrained without one point, warm-started from the
    full-data optimum ``init``."""
    keep = torch.ones(task.n_train, dtype=torch.bool)
    keep[plan.meta["indices"][unit]] = False
    model = task.build_model(RETRAIN_SEED_BASE)
    model.load_state_dict(init)
    task.fit(model, seed=RETRAIN_SEED_BASE, indices=keep.nonzero().flatten())
    return task.measure_queries(model)


def _reference(task: Task) -> tuple[dict, torch.Tensor]:
    """The full-data model of LOO (seed-independent for a convex task) and f(θ)."""
    model = task.build_model(RETRAIN_SEED_BASE)
    task.fit(model, seed=RETRAIN_SEED_BASE)
    return model.state_dict(), task.measure_queries(model)


# The work of a shard: its units -> the payload's tensors (``values [U, Q]`` and any extra),
# given a progress-bar label. LOO/LDS retrain (:func:`retraining`); PBRF solves responses.
Work = Callable[[list[int], str], dict[str, torch.Tensor]]


def retraining(task: Task, plan: Plan, vectorise: bool = True) -> Work:
    """The work of LOO/LDS shards: retrain ``task`` for each unit and measure the queries.

    ``vectorise`` trains a shard's models together when the task supports it
    (:meth:`~tasks.base.Task.fit_many`); the result is the same either way.
    """

    def work(units: list[int], desc: str) -> dict[str, torch.Tensor]:
        if plan.kind == "lds":
            values = fit_and_measure(task, [_lds_job(plan, u) for u in units], vectorise, desc)
            return {"values": torch.stack(values) if values else torch.zeros(0)}
        init, reference = _reference(task)
        values = [_retrain_loo(task, plan, u, init) for u in tqdm(units, desc=desc, disable=None)]
        return {"values": torch.stack(values) if values else torch.zeros(0),
                "reference": reference}

    return work


def compute_shard(work: Work, plan: Plan, cache_dir: Path, shard: int, num_shards: int,
                  num_threads: int = 1, wait: bool = True) -> Path | None:
    """Computes one shard (if not cached) and writes it atomically; returns its path.

    The shard's lock is held while computing, so a concurrent job that needs the same shard
    waits for it (``wait=True``) instead of computing it again; with ``wait=False`` this
    returns None at once when another process holds the lock.
    """
    path = plan.shard_path(cache_dir, shard, num_shards)
    sweep_stale_temp_files(path.parent)
    if load_checked(path, plan.key) is not None:
        return path
    with cache_lock(path, blocking=False) as locked:
        if locked:
            return _compute_locked(work, plan, path, shard, num_shards, num_threads)
    if not wait:
        return None
    log.info("Waiting for %s shard %d/%d: another job is computing it (lock %s)", plan.kind,
             shard + 1, num_shards, lock_path(path))
    with cache_lock(path):
        return _compute_locked(work, plan, path, shard, num_shards, num_threads)


def _compute_locked(work: Work, plan: Plan, path: Path, shard: int, num_shards: int,
                    num_threads: int) -> Path:
    """Computes and writes a shard; the caller holds its lock."""
    if load_checked(path, plan.key) is not None:  # written while we waited for the lock
        log.info("%s shard %d/%d was computed by another job: %s", plan.kind, shard + 1,
                 num_shards, path)
        return path
    units = plan.units[shard::num_shards]
    log.info("Computing %s shard %d/%d (%d units) into %s", plan.kind, shard + 1, num_shards,
             len(units), path)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        computed = work(units, f"{plan.kind.upper()}, shard {shard + 1}/{num_shards}")
    finally:
        torch.set_num_threads(previous_threads)
    save_atomic({"key": plan.key, "units": torch.tensor(units, dtype=torch.long), **computed},
                path)
    return path


def missing_shards(plan: Plan, cache_dir: Path, num_shards: int) -> list[int]:
    """Shards of a ``num_shards`` split that have no valid file yet."""
    return [s for s in range(num_shards)
            if load_checked(plan.shard_path(cache_dir, s, num_shards), plan.key) is None]


def assemble(plan: Plan, cache_dir: Path, num_shards: int) -> dict[str, torch.Tensor]:
    """Joins the shards of a complete split into the ground truth.

    Returns:
        for ``lds``: ``masks [M, N]``, ``values [M, K, Q]`` (per seed) and ``outputs [M, Q]``
        (seed-averaged); for ``loo``: ``indices [L]``, ``reference [Q]`` and
        ``effects [L, Q]`` = f(θ) − f(θ₋ₘ); for ``pbrf``: ``indices [L]`` and
        ``effects [L, Q]`` = (f(θ*) − f(θˢ))/ε; for ``removal*`` (:mod:`bench.removal`):
        ``removed [S, k]`` and ``values [U, Q]``.
    """
    payloads = [load_checked(plan.shard_path(cache_dir, s, num_shards), plan.key)
                for s in range(num_shards)]
    if any(p is None for p in payloads):
        raise GroundTruthMissing(f"{plan.kind} ground truth is incomplete")
    units = torch.cat([p["units"] for p in payloads])
    values = torch.cat([p["values"] for p in payloads if p["values"].numel()])
    values = values[torch.argsort(units)]
    if plan.kind == "lds":
        per_seed = values.view(plan.spec["subsets"], plan.spec["seeds"], -1)
        return {"masks": plan.meta["masks"], "values": per_seed, "outputs": per_seed.mean(1)}
    if plan.kind == "pbrf":
        return {"indices": plan.meta["indices"], "effects": values}
    if plan.kind.startswith("removal"):  # bench.removal: per-unit measurements [U, Q]
        return {**plan.meta, "values": values}
    reference = payloads[0]["reference"]
    return {"indices": plan.meta["indices"], "reference": reference,
            "effects": reference[None, :] - values}


def complete_split(plan: Plan, cache_dir: Path) -> int | None:
    """The shard count of a split already complete in the cache (any ``num_shards``), or None."""
    counts = sorted({int(p.stem.rsplit("-", 1)[-1])
                     for p in plan.directory(cache_dir).glob("shard-*-of-*.pt")})
    return next((n for n in counts if not missing_shards(plan, cache_dir, n)), None)


def shard_command(plan: Plan, num_shards: int, shards: list[int],
                  overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The ``tda-bench`` multirun that computes ``shards`` of a ``num_shards`` split."""
    return " ".join(["tda-bench -m stage=ground_truth", f"task={plan.task_name}", *overrides,
                     f"ground_truth.num_shards={num_shards}",
                     f"ground_truth.shard={','.join(map(str, shards))}"])


def load_or_compute(work: Work, plan: Plan, cache_dir: Path, options: GroundTruthOptions,
                    overrides: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The ground truth of ``plan``: from the cache (a complete split of any shard count), or
    computed where ``on_missing`` allows.

    ``overrides`` (the run's task, cache and launcher overrides) complete the command that
    the ``on_missing=error`` message prints. Concurrent jobs that compute the same missing
    shards share the work: each first takes the shards no other job holds, then waits for
    the rest.
    """
    done = complete_split(plan, cache_dir)
    if done is not None:
        return assemble(plan, cache_dir, done)
    num_shards = started_split(plan, cache_dir, options.num_shards)
    missing = missing_shards(plan, cache_dir, num_shards)
    if missing and options.on_missing == "error":
        raise GroundTruthMissing(
            f"{plan.kind} ground truth of task {plan.task_name} is missing shards {missing} of "
            f"{num_shards} (in {plan.directory(cache_dir)}). Compute them with:\n"
            f"  {shard_command(plan, num_shards, missing, overrides)}\n"
            "then rerun this command; or set ground_truth.on_missing=compute to compute them "
            "in this run."
        )
    held_elsewhere = [s for s in missing if compute_shard(
        work, plan, cache_dir, s, num_shards, options.num_threads, wait=False) is None]
    for shard in held_elsewhere:
        compute_shard(work, plan, cache_dir, shard, num_shards, options.num_threads)
    return assemble(plan, cache_dir, num_shards)


def started_split(plan: Plan, cache_dir: Path, num_shards: int) -> int:
    """The split to complete: ``num_shards`` if any of its shards exist, else the split with
    the most shards in the cache (so finished shards are never redone), else ``num_shards``."""
    present: dict[int, int] = {}
    for path in plan.directory(cache_dir).glob("shard-*-of-*.pt"):
        count = int(path.stem.rsplit("-", 1)[-1])
        present[count] = present.get(count, 0) + 1
    if num_shards in present or not present:
        return num_shards
    best = max(present, key=lambda n: (present[n] / n, -n))
    log.info("Completing the %d-shard split of %s ground truth already in the cache (%d of %d "
             "shards present) instead of starting a %d-shard split.", best, plan.kind,
             present[best], best, num_shards)
    return best
