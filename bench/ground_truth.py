"""The ground-truth driver: units in shards, locks, and the verified cache.

A ground-truth kind (:mod:`bench.truths`: LOO, LDS, PBRF, counterfactual removal, ...)
plans its work as a list of *units* (one retrained model, one proximal response, ...) and
computes a batch of them; this module knows nothing else about it. Shard ``s`` of ``S``
takes units ``s, s+S, s+2S, ...`` and is written atomically as its own file, so shards can
run as separate jobs (SLURM arrays). A shard is computed under a lock, so two jobs never
compute the same shard at once; a job killed mid-shard leaves no shard file, and the bytes of
a shard file depend only on its content, so a rerun after a crash reproduces the cache of an
uninterrupted run byte for byte. Each shard file is verified on load: its key, its slot (the
units it holds, so a shard copied over another's name is refused) and the checksum of its
tensors; a file that fails is recomputed. Torch's thread count is fixed while computing so
that every sharding gives the same numbers. A complete split of any shard count is reused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.cache import (
    cache_lock,
    load_checked,
    lock_path,
    save_atomic,
    sweep_stale_temp_files,
)
from estimators.options import OptionError, arguments_of, choice, flag, natural, positive

log = logging.getLogger(__name__)



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
        with arguments_of(type(self).__name__, "ground_truth"):
            object.__setattr__(self, "num_shards", positive("num_shards", self.num_shards,
                                                            integer=True))
            object.__setattr__(self, "shard", natural("shard", self.shard))
            if self.shard >= self.num_shards:
                raise OptionError(f"{{shard}} must be in [0, {self.num_shards}) for "
                                  f"{{num_shards}}={self.num_shards}, got {self.shard}")
            object.__setattr__(self, "num_threads", positive("num_threads", self.num_threads,
                                                             integer=True))
            choice("on_missing", self.on_missing, ("compute", "error"))
            flag("vectorise", self.vectorise)


class GroundTruthMissing(RuntimeError):
    """Raised when shards are missing and ``on_missing=error``."""


@dataclass
class Plan:
    """The work of one ground truth: its kind, cache key, settings, units and the tensors
    that define the units (``meta``, e.g. LDS's subset masks)."""

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

    def slot(self, shard: int, num_shards: int) -> list[int]:
        """The units shard ``shard`` of ``num_shards`` holds: its file's verified slot."""
        return list(self.units[shard::num_shards])

    def load(self, cache_dir: Path, shard: int, num_shards: int) -> dict | None:
        """The verified payload of a shard (key, slot and checksum checked), or None."""
        return load_checked(self.shard_path(cache_dir, shard, num_shards), self.key,
                            self.slot(shard, num_shards))


# The work of a shard: its units -> the payload's tensors (``values [U, ...]`` and any other),
# given a progress-bar label.
Work = Callable[[list[int], str], dict[str, torch.Tensor]]


@dataclass
class Shards:
    """A complete split joined: ``values [U, ...]`` in unit order, and every shard's payload
    (for tensors other than ``values``)."""

    values: torch.Tensor
    payloads: list[dict[str, torch.Tensor]]


def compute_shard(work: Work, plan: Plan, cache_dir: Path, shard: int, num_shards: int,
                  num_threads: int = 1, wait: bool = True) -> Path | None:
    """Computes one shard (if not cached) and writes it atomically; returns its path.

    The shard's lock is held while computing, so a concurrent job that needs the same shard
    waits for it (``wait=True``) instead of computing it again; with ``wait=False`` this
    returns None at once when another process holds the lock.
    """
    path = plan.shard_path(cache_dir, shard, num_shards)
    sweep_stale_temp_files(path.parent)
    if plan.load(cache_dir, shard, num_shards) is not None:
        return path
    with cache_lock(path, blocking=False) as locked:
        if locked:
            return _compute_locked(work, plan, cache_dir, shard, num_shards, num_threads)
    if not wait:
        return None
    log.info("Waiting for %s shard %d/%d: another job is computing it (lock %s)", plan.kind,
             shard + 1, num_shards, lock_path(path))
    with cache_lock(path):
        return _compute_locked(work, plan, cache_dir, shard, num_shards, num_threads)


def _compute_locked(work: Work, plan: Plan, cache_dir: Path, shard: int, num_shards: int,
                    num_threads: int) -> Path:
    """Computes and writes a shard; the caller holds its lock."""
    path = plan.shard_path(cache_dir, shard, num_shards)
    if plan.load(cache_dir, shard, num_shards) is not None:  # written while we waited
        log.info("%s shard %d/%d was computed by another job: %s", plan.kind, shard + 1,
                 num_shards, path)
        return path
    units = plan.slot(shard, num_shards)
    log.info("Computing %s shard %d/%d (%d units) into %s", plan.kind, shard + 1, num_shards,
             len(units), path)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        computed = work(units, f"{plan.kind.upper()}, shard {shard + 1}/{num_shards}")
    finally:
        torch.set_num_threads(previous_threads)
    save_atomic({"key": plan.key, "units": torch.tensor(units, dtype=torch.long), **computed},
                path, slot=units)
    return path


def missing_shards(plan: Plan, cache_dir: Path, num_shards: int) -> list[int]:
    """Shards of a ``num_shards`` split that have no valid file yet."""
    return [s for s in range(num_shards) if plan.load(cache_dir, s, num_shards) is None]


def join(plan: Plan, cache_dir: Path, num_shards: int) -> Shards:
    """Joins the shards of a complete ``num_shards`` split (values in unit order)."""
    payloads = [plan.load(cache_dir, s, num_shards) for s in range(num_shards)]
    if any(p is None for p in payloads):
        raise GroundTruthMissing(f"{plan.kind} ground truth is incomplete")
    units = torch.cat([p["units"] for p in payloads])
    values = torch.cat([p["values"] for p in payloads if p["values"].numel()])
    return Shards(values[torch.argsort(units)], payloads)


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
                    overrides: list[str] | tuple[str, ...] = ()) -> Shards:
    """The shards of ``plan``, joined: from the cache (a complete split of any shard count),
    or computed where ``on_missing`` allows.

    ``overrides`` (the run's task, cache and launcher overrides) complete the command that
    the ``on_missing=error`` message prints. Concurrent jobs that compute the same missing
    shards share the work: each first takes the shards no other job holds, then waits for
    the rest.
    """
    done = complete_split(plan, cache_dir)
    if done is not None:
        return join(plan, cache_dir, done)
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
    return join(plan, cache_dir, num_shards)


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
