"""Fits and scores as sharded jobs, through the ground-truth driver (:mod:`bench.ground_truth`).

* **factors** (``stage=factors``, ``factors.shard``/``factors.num_shards``): every pass of
  the estimator's fit (:meth:`~estimators.base.Estimator.fit_passes`: K-FAC's covariances,
  EK-FAC's eigenvalue correction) is a plan of blocks; shard s computes blocks s, s+S, ...
  and writes their partial sums; once a split is complete, the pass's finish (the one
  eigendecomposition, or Λ) runs under a lock, so concurrent jobs do it once and the others
  load its result from the factor cache. A job goes on to the next pass, computing the
  shards no other job holds (as the driver does for ground truth).
* **scores** (``stage=score``, ``score.shard``/``score.num_shards``): the units are chunks of
  the training set (the estimator's chunk size after the memory plan); shard s scores chunks
  s, s+S, ... against every query and writes its ``[units, Q, chunk]`` block (or, with
  ``score.top_k``, only each query's top k) atomically. ``stage=merge`` (or ``stage=all``
  with ``score.num_shards > 1``) joins a complete split into ``[n_queries, n_train]``.

Every unit is computed exactly as one job computes it (same examples, same shapes, partial
sums added as double-double pairs), so a sharded pipeline gives one job's bits on CPU, with
the same thread count and memory budget in every job. A one-job fit or score with one shard
writes no shard files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from bench.cache import cache_lock, content_hash
from bench.ground_truth import (
    GroundTruthOptions,
    Plan,
    complete_split,
    compute_shard,
    join,
    load_or_compute,
    missing_shards,
)
from estimators.base import Estimator

log = logging.getLogger("tda-bench")

SCORES_VERSION = 1  # bump when score shards' layout changes (part of their key)


class ShardPlan(Plan):
    """A driver plan whose files live under ``<cache_dir>/<folder>/`` instead of
    ``ground_truth/``."""

    folder = "factors"

    def directory(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / self.folder / self.task_name / f"{self.kind}-{self.key}"


class ScorePlan(ShardPlan):
    folder = "scores"


def _threads(cfg) -> int:
    return int(cfg.num_threads) if cfg.get("num_threads") else torch.get_num_threads()


def _present(plan: Plan, cache_dir: Path) -> bool:
    folder = plan.directory(cache_dir)
    return folder.exists() and any(folder.glob("shard-*-of-*.pt"))


def _missing_error(plan: Plan, cache_dir: Path, num_shards: int, stage: str, key: str) -> None:
    missing = missing_shards(plan, cache_dir, num_shards)
    if missing:
        raise ValueError(
            f"{plan.kind} of task {plan.task_name} is missing shards {missing} of {num_shards} "
            f"(in {plan.directory(cache_dir)}): run stage={stage} with {key}.num_shards="
            f"{num_shards} {key}.shard={','.join(map(str, missing))} first (the same task, "
            "estimator, cache_dir and memory_budget_mb).")


def fit(job, shard: int | None = None) -> list[Path]:
    """The estimator's fit, pass by pass: in this process when ``factors.num_shards`` is 1
    and no split is in the cache, else through the driver; with ``shard`` (stage=factors),
    that shard of every pass first. Returns the shard files written or read."""
    cfg, estimator, problem = job.cfg, job.estimator, job.problem
    if type(estimator).fit_passes is Estimator.fit_passes:  # a fit that does not shard
        estimator.fit(problem)
        return []
    options = GroundTruthOptions(shard=int(cfg.factors.shard),
                                 num_shards=int(cfg.factors.num_shards),
                                 num_threads=_threads(cfg))
    cache_dir, paths = Path(cfg.cache_dir), []
    for fit_pass in estimator.fit_passes(problem):
        plan = ShardPlan(cfg.task_name, f"{cfg.estimator_name}-{fit_pass.name}", fit_pass.key,
                         {}, list(range(fit_pass.n_blocks)), {})

        def work(units, label, fit_pass=fit_pass):
            log.info("%s: %d blocks", label, len(units))
            return fit_pass.compute(units)

        if shard is None and options.num_shards == 1 and not _present(plan, cache_dir):
            payloads = [fit_pass.compute(plan.units)]
        else:
            if shard is not None:
                paths.append(compute_shard(work, plan, cache_dir, shard, options.num_shards,
                                           options.num_threads))
            payloads = load_or_compute(work, plan, cache_dir, options).payloads
        with cache_lock(plan.directory(cache_dir) / "finish.pt"):
            fit_pass.finish(payloads)
    return paths


def score_plan(job) -> ScorePlan:
    """The plan of ``job``'s score shards: units = chunks of the training set."""
    cfg, estimator, problem = job.cfg, job.estimator, job.problem
    chunk = int(getattr(estimator, "chunk_size", 256))
    settings = OmegaConf.to_container(cfg.estimator, resolve=True)
    for where in ("cache_dir", "index_dir"):  # where things are kept, not what they are
        settings.pop(where, None)
    queries = [batch for batch in problem.loader("queries", 256)]
    spec = {"version": SCORES_VERSION, "problem": problem.key, "estimator": cfg.estimator_name,
            "settings": settings, "queries": content_hash(queries), "n_train": problem.n_train,
            "chunk": chunk, "top_k": cfg.score.top_k}
    units = list(range(-(-problem.n_train // chunk)))
    return ScorePlan(cfg.task_name, cfg.estimator_name, content_hash(spec), spec, units, {})


def _work(job, plan: ScorePlan):
    estimator, problem = job.estimator, job.problem
    chunk, top_k = plan.spec["chunk"], plan.spec["top_k"]

    def work(units: list[int], label: str) -> dict[str, Tensor]:
        log.info("Scoring %s: %d chunks of %d training examples", label, len(units), chunk)
        columns = torch.cat([torch.arange(u * chunk, min((u + 1) * chunk, problem.n_train))
                             for u in units]) if units else torch.zeros(0, dtype=torch.long)
        values = estimator.score_columns(problem, columns).float().cpu() if units else None
        if top_k:
            total = values.sum(0) if values is not None and values.ndim == 3 else values
            k = min(int(top_k), len(columns))
            top = total.nan_to_num(float("-inf")).topk(k, dim=-1)
            return {"values": torch.zeros(len(units)), "top_values": top.values,
                    "top_index": columns[top.indices]}
        lead = values.shape[:-1] if values is not None else (problem.n_queries,)
        out = torch.full((len(units), *lead, chunk), float("nan"))
        start = 0
        for n, u in enumerate(units):
            width = min(chunk, problem.n_train - u * chunk)
            out[n, ..., :width] = values[..., start:start + width]
            start += width
        return {"values": out}

    return work


def score_shard(job, shard: int) -> Path:
    """``stage=score``: computes (if not cached) and writes score shard ``shard``."""
    cfg = job.cfg
    plan = score_plan(job)
    return compute_shard(_work(job, plan), plan, Path(cfg.cache_dir), shard,
                         int(cfg.score.num_shards), _threads(cfg))


def merged_scores(job, on_missing: str) -> Tensor:
    """The joined score shards ``[n_queries, n_train]`` (per-layer scores go to the
    estimator's ``layer_scores``); ``on_missing``: ``compute`` or ``error``."""
    cfg, problem = job.cfg, job.problem
    plan, cache_dir = score_plan(job), Path(cfg.cache_dir)
    options = GroundTruthOptions(num_shards=int(cfg.score.num_shards), num_threads=_threads(cfg),
                                 on_missing="compute")
    done = complete_split(plan, cache_dir)
    if done is not None:
        shards = join(plan, cache_dir, done)
    else:
        if on_missing == "error":
            _missing_error(plan, cache_dir, options.num_shards, "score", "score")
        shards = load_or_compute(_work(job, plan), plan, cache_dir, options)
    if plan.spec["top_k"]:
        scores = torch.full((problem.n_queries, problem.n_train), float("nan"))
        values = torch.cat([p["top_values"] for p in shards.payloads], dim=1)
        index = torch.cat([p["top_index"] for p in shards.payloads], dim=1)
        top = values.topk(min(int(plan.spec["top_k"]), values.shape[1]), dim=1)
        scores.scatter_(1, index.gather(1, top.indices), top.values)
        return scores
    values = shards.values  # [chunks, (L,) Q, chunk]
    joined = values.movedim(0, -2).flatten(-2)[..., :problem.n_train]
    if joined.ndim == 3:
        job.estimator.layer_scores = joined
        return joined.sum(0)
    return joined
