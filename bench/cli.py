"""The ``tda-bench`` command: one run = (task, estimator, seed) -> metrics.

    task config ──► trained model (cached) ──► AttributionProblem ──► estimator.fit/score
                 └► ground truth (cached, sharded) ─────────────────► metrics ──► records, W&B

``stage=ground_truth`` computes one ground-truth shard and stops (for fan-out as jobs);
``stage=all`` (default) runs the whole benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bench import ground_truth as gt
from bench import pbrf
from bench.cache import cache_lock, content_hash, load_checked, save_atomic
from bench.loggers import flatten
from bench.metrics import evaluate, lds_ceiling, mislabel_metrics
from bench.record import (
    peak_rss_mb,
    provenance,
    reset_peak_rss,
    write_layer_scores,
    write_records,
)
from estimators.base import GradientEstimator
from estimators.problem import Checkpoint
from tasks.base import Task

log = logging.getLogger("tda-bench")

CONF_DIR = str(resources.files("conf"))
USER_ERRORS = (ValueError, gt.GroundTruthMissing, FloatingPointError, FileNotFoundError)


def task_config(cfg: DictConfig) -> dict[str, Any]:
    """The task's resolved config: what (with the class VERSION) keys every task cache."""
    return OmegaConf.to_container(cfg.task, resolve=True)


def model_key(task: Task, cfg: DictConfig, seed: int | None = None) -> str:
    """The cache key of the attributed model for ``seed`` (default ``cfg.seed``); also the
    problem's ``key`` for factor and gradient caches."""
    seed = cfg.seed if seed is None else int(seed)
    identity = {"task": cfg.task_name, "config": task_config(cfg), "version": task.VERSION,
                "class": type(task).__qualname__, "seed": seed, "what": "model"}
    return content_hash(identity)


def trained_model(task: Task, cfg: DictConfig, cache_dir: Path, seed: int | None = None):
    """The attributed model for ``seed`` (default ``cfg.seed``): from the cache, or trained
    and cached."""
    seed = cfg.seed if seed is None else int(seed)
    key = model_key(task, cfg, seed)
    path = Path(cache_dir) / "models" / cfg.task_name / f"{key}.pt"
    model = task.build_model(seed)
    payload = load_checked(path, key)
    if payload is None:
        with cache_lock(path):  # concurrent jobs of a sweep train each model once
            payload = load_checked(path, key)
            if payload is None:
                log.info("Training %s (seed %d)", cfg.task_name, seed)
                checkpoints = task.fit(model, seed=seed, progress=cfg.progress)
                save_atomic({"key": key, "checkpoints": [vars(c) for c in checkpoints]}, path)
    if payload is not None:
        log.info("Loaded trained %s (seed %d) from %s", cfg.task_name, seed, path)
        checkpoints = [Checkpoint(**c) for c in payload["checkpoints"]]
    model.load_state_dict(checkpoints[-1].state_dict)
    return model, checkpoints


def ground_truths(task: Task, cfg: DictConfig, options: gt.GroundTruthOptions) -> dict:
    """Every ground truth the task offers, from the cache or computed."""
    plans = [gt.plan(task, cfg.task_name, task_config(cfg), kind) for kind in task.ground_truths]
    overrides = ground_truth_overrides(cfg)
    return {p.kind: gt.load_or_compute(gt.retraining(task, p, options.vectorise), p,
                                       Path(cfg.cache_dir), options, overrides)
            for p in plans}


GROUND_TRUTH_PREFIXES = ("task.", "+task.", "++task.", "~task.", "experiment=", "hydra/launcher=",
                         "hydra.launcher.", "device=")


def ground_truth_overrides(cfg: DictConfig) -> list[str]:
    """The overrides of this run that a ground-truth job must repeat (task values, experiment,
    launcher), shell-quoted, and the resolved ``cache_dir``."""
    try:
        hydra_cfg = HydraConfig.get()
        given = [*hydra_cfg.overrides.task, *hydra_cfg.overrides.hydra]
    except ValueError:
        given = []
    keep = [o for o in given if o.startswith(GROUND_TRUTH_PREFIXES)]
    return [*map(shlex.quote, keep), shlex.quote(f"cache_dir={Path(cfg.cache_dir).resolve()}")]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one benchmark job and returns its record (also written to the run directory)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    pair = f"{cfg.task_name}/{cfg.estimator_name}"
    if pair in (cfg.get("skip") or {}):
        raise ValueError(f"{pair} is skipped by this sweep: {cfg.skip[pair]} (remove it from "
                         "`skip` to run it)")
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(cfg.seed)
    options = gt.GroundTruthOptions(**cfg.ground_truth)
    task: Task = instantiate(cfg.task, device=cfg.device)

    if cfg.stage == "ground_truth":
        paths = []
        for kind in task.ground_truths:
            plan = gt.plan(task, cfg.task_name, task_config(cfg), kind)
            paths.append(gt.compute_shard(gt.retraining(task, plan, options.vectorise), plan,
                                          Path(cfg.cache_dir), options.shard,
                                          options.num_shards, options.num_threads))
        if getattr(task, "pbrf", None):  # depends on the attributed model, so on cfg.seed
            problem = task.problem(*trained_model(task, cfg, Path(cfg.cache_dir))).to(task.device)
            plan = pbrf.plan(task, cfg.task_name, task_config(cfg), problem)
            paths.append(gt.compute_shard(pbrf.responses(problem, plan), plan,
                                          Path(cfg.cache_dir), options.shard,
                                          options.num_shards, options.num_threads))
        log.info("Ground-truth shard %d/%d written: %s", options.shard + 1, options.num_shards,
                 ", ".join(map(str, paths)))
        return {"stage": "ground_truth", "shards": [str(p) for p in paths]}
    if cfg.stage != "all":
        raise ValueError(f"stage must be 'all' or 'ground_truth', got {cfg.stage!r}")

    truths = ground_truths(task, cfg, options)
    model, checkpoints = trained_model(task, cfg, Path(cfg.cache_dir))
    problem = task.problem(model, checkpoints).to(task.device)
    problem.key = problem.key or model_key(task, cfg)
    # More models of the same task (TRAK's ensemble), trained once and cached like this one.
    problem.extra.setdefault("train_model", lambda seed: trained_model(
        task, cfg, Path(cfg.cache_dir), seed)[0].to(task.device))
    if getattr(task, "pbrf", None):  # depends on the attributed model, so on cfg.seed
        plan = pbrf.plan(task, cfg.task_name, task_config(cfg), problem)
        truths["pbrf"] = gt.load_or_compute(pbrf.responses(problem, plan), plan,
                                            Path(cfg.cache_dir), options,
                                            [*ground_truth_overrides(cfg), f"seed={cfg.seed}"])
    estimator = instantiate(cfg.estimator)
    if cfg.get("memory_budget_mb") and isinstance(estimator, GradientEstimator):
        estimator.fit_chunk_to_budget(problem, float(cfg.memory_budget_mb))

    reset_peak_rss()  # peak_rss_mb measures fit + score, also inside a multirun
    start = time.perf_counter()
    estimator.fit(problem)
    fitted = time.perf_counter()
    scores = estimator.score(problem).detach().float().cpu()
    scored = time.perf_counter()
    if scores.shape != (problem.n_queries, problem.n_train):
        raise RuntimeError(f"{cfg.estimator_name} returned scores of shape {tuple(scores.shape)},"
                           f" expected {(problem.n_queries, problem.n_train)}")

    metrics, per_query = evaluate(scores, truths)
    if "proponents" in problem.extra:  # fact tracing: the proponents are the ground truth
        from bench.fact_metrics import fact_tracing
        facts, facts_per_query = fact_tracing(problem, scores, **cfg.get("fact_metrics", {}))
        metrics.update(facts)
        per_query.update(facts_per_query)
    metrics.update(problem.extra.get("metrics", {}))  # task-reported, e.g. query_accuracy
    if "flipped" in problem.extra:  # a mislabel-detection task
        metrics.update(mislabel(estimator, problem, cfg.estimator_name))
    metrics.update(fit_seconds=fitted - start, score_seconds=scored - fitted,
                   peak_rss_mb=peak_rss_mb())
    # Counterfactual removal (opt-in), after peak_rss_mb so that it measures fit + score only.
    if cfg.get("removal") and cfg.removal.get("enabled"):
        from bench.removal import RemovalOptions, removal_metrics
        removal, removal_per_query = removal_metrics(
            task, cfg.task_name, task_config(cfg), scores, RemovalOptions(**cfg.removal),
            Path(cfg.cache_dir), options)
        metrics.update(removal)
        per_query.update(removal_per_query)
    ceiling = lds_ceiling(truths["lds"]["values"]) if "lds" in truths else None
    if ceiling is not None:
        metrics["lds_ceiling"] = ceiling  # the LDS noise ceiling (split-half over GT seeds)
    diagnostics = getattr(estimator, "diagnostics", None) or {}  # e.g. LiSSA's convergence
    metrics.update({k: float(v) for k, v in diagnostics.items()})
    record = {"task": cfg.task_name, "estimator": cfg.estimator_name, "seed": int(cfg.seed),
              **metrics, **provenance(command_line())}
    write_records(out_dir, record, per_query, scores if cfg.save_scores else None)
    if cfg.save_scores and getattr(estimator, "layer_scores", None) is not None:
        write_layer_scores(out_dir, estimator, problem)

    group = cfg.experiment_name or cfg.task_name
    logger = instantiate(cfg.logger)
    logger.log_run(name=f"{cfg.task_name}/{cfg.estimator_name}/seed{cfg.seed}", group=group,
                   job_type=cfg.estimator_name, config=OmegaConf.to_container(cfg, resolve=True),
                   metrics=metrics, out_dir=out_dir, scores=scores,
                   train_text=problem.train_text, query_text=problem.query_text)
    print_table(record, out_dir)
    return record


def mislabel(estimator, problem, name: str) -> dict[str, float]:
    """Mislabel-detection metrics from the estimator's self-influence (none if it has none)."""
    start = time.perf_counter()
    try:
        values = estimator.self_influence(problem)
    except NotImplementedError as err:
        log.warning("%s; no mislabel metrics for %s.", err, name)
        return {}
    return {**mislabel_metrics(values.detach().float().cpu(), problem.extra["flipped"]),
            "self_influence_seconds": time.perf_counter() - start}


def command_line() -> str:
    """The ``tda-bench`` command that reproduces this job (its overrides)."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        overrides = sys.argv[1:]
    return " ".join(["tda-bench", *overrides])


def print_table(record: dict[str, Any], out_dir: Path) -> None:
    keys = ["lds", "lds_sem", "loo_pearson", "loo_spearman", "pbrf_pearson", "pbrf_spearman",
            "mislabel_auc", "mislabel_recall@10pct", "mislabel_recall@20pct", "removal_drop",
            "removal_drop_random", "fit_seconds",
            "score_seconds", "peak_rss_mb"]
    keys[6:6] = [k for k in record if k.startswith(("mrr", "recall@", "tail_patch", "proponent_",
                                                    "flipped_", "query_accuracy"))]
    lines = [f"{record['task']} / {record['estimator']} / seed {record['seed']}"]
    lines += [f"  {k:<14} {record[k]:>10.4f}" for k in keys if record.get(k) is not None]
    lines.append(f"  records in {out_dir}")
    print("\n".join(lines), flush=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Entry point of the ``tda-bench`` console script."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("TDA_BENCH_DEBUG"):
            raise
        log.error("%s", err)
        print(f"tda-bench: error: {err}", file=sys.stderr)
        if multirun:  # one job of a sweep (e.g. bm25 on a task without text): record why, go on
            write_error(cfg, str(err))
            return
        sys.exit(2)
    except Exception as err:
        if multirun:  # a bug: leave a trace the leaderboard's "Not run" shows, then fail as usual
            log.exception("job failed")
            write_error(cfg, f"{type(err).__name__}: {err}", traceback.format_exc())
        raise


def write_error(cfg: DictConfig, error: str, trace: str | None = None) -> None:
    """``error.json`` in the job's folder: what failed and why (and the traceback of a bug)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"task": cfg.task_name, "estimator": cfg.estimator_name, "seed": cfg.seed,
               "error": error, **({"traceback": trace} if trace else {})}
    (out_dir / "error.json").write_text(json.dumps(payload, indent=2) + "\n")


__all__ = ["main", "run", "flatten", "write_error"]
