"""One benchmark job as named stages; each is a function of the :class:`Job` it advances.

    resolve ─► ground_truth("task") ─► model ─► ground_truth("model") ─► fit ─► score
            ─► evaluate (ground_truth("scores"), metrics) ─► record (files, logger)

``resolve`` validates everything before any work (:mod:`bench.checks`): the top-level
values, plug-ins, the task, its ground-truth kinds and their settings, the estimator, and a
writable ``cache_dir`` with room for what the run writes; a bad value fails in seconds.
``stage=ground_truth`` runs only ``resolve`` and one shard of every sharded kind
(:func:`ground_truth_shards`), for fan-out as jobs; ``stage=factors`` runs ``resolve``,
``model`` and one shard of every fit pass (:mod:`bench.sharding`); ``stage=score`` adds one
shard of the scores; ``stage=merge`` runs the whole job with the scores joined from their
shards. Data flows one way: the task builds the problem, the estimator scores it, the ground
truths and metrics judge the scores.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from bench import sharding
from bench.cache import sweep_stale_temp_files
from bench.checks import (
    build,
    check_cache_dir,
    check_run_settings,
    expected_write_bytes,
    ground_truth_options,
)
from bench.metrics import evaluate as compute_metrics
from bench.models import model_key, task_config, trained_model
from bench.plugins import load_plugins
from bench.record import peak_rss_mb, reset_peak_rss
from bench.truths import GroundTruth, TruthContext, truth_kinds
from estimators import memory
from estimators.base import Estimator, GradientEstimator
from estimators.problem import AttributionProblem
from tasks.base import Task

log = logging.getLogger("tda-bench")

# Overrides a ground-truth job must repeat: they change the task or where the cache is.
GROUND_TRUTH_PREFIXES = ("task.", "+task.", "++task.", "~task.", "experiment=", "hydra/launcher=",
                         "hydra.launcher.", "device=", "plugins=", "+plugins=")


@dataclass
class Job:
    """One (task, estimator, seed) job as it moves through the stages."""

    cfg: DictConfig
    task: Task
    estimator: Estimator
    kinds: dict[str, GroundTruth]
    ctx: TruthContext
    plugins: list[str] = field(default_factory=list)
    logger: Any = None
    problem: AttributionProblem | None = None
    truths: dict[str, Any] = field(default_factory=dict)
    scores: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.cfg.task_name}/{self.cfg.estimator_name}/seed{self.cfg.seed}"


def resolve(cfg: DictConfig) -> Job:
    """Validates the run's values, loads plug-ins and instantiates and validates every part
    of the job, and checks the cache directory; nothing is trained or computed yet."""
    check_run_settings(cfg)
    plugins = load_plugins(cfg.get("plugins") or [])
    pair = f"{cfg.task_name}/{cfg.estimator_name}"
    if pair in (cfg.get("skip") or {}):
        raise ValueError(f"{pair} is skipped by this sweep: {cfg.skip[pair]} (remove it from "
                         "`skip` to run it)")
    settings = (cfg.get("pair_settings") or {}).get(pair)
    if settings:  # this pair's estimator settings in a sweep (e.g. LiSSA's sample on facts)
        with open_dict(cfg):
            cfg.estimator = OmegaConf.merge(cfg.estimator, settings)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.get("tf32") is not None:  # TF32 matmuls on Ampere+ GPUs (float32 models only)
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    for block, key in ((cfg.get("factors"), "factors"), (cfg.get("score"), "score")):
        if block is not None and not 0 <= int(block.shard) < int(block.num_shards):
            raise ValueError(f"{key}.shard must be in [0, {block.num_shards}), got {block.shard}")
    torch.manual_seed(cfg.seed)
    options = ground_truth_options(cfg.ground_truth)
    task: Task = build(cfg.task, "task", cfg.task_name, device=cfg.device)
    kinds = configured_kinds(cfg, task)
    estimator = build(cfg.estimator, "estimator", cfg.estimator_name)
    check_text(task, estimator, cfg.estimator_name)
    logger = build(cfg.logger, "logger", _choice("logger"))
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    cached = (cache_dir / "models" / cfg.task_name / f"{model_key(task, cfg)}.pt").exists()
    needed = expected_write_bytes(task, int(cfg.seed), _score_count(task), cached)
    check_cache_dir(cache_dir, needed)
    sweep_stale_temp_files(cache_dir, recursive=True)
    ctx = TruthContext(task, cfg.task_name, task_config(cfg), cache_dir, options,
                       ground_truth_overrides(cfg), seed=int(cfg.seed))
    return Job(cfg, task, estimator, kinds, ctx, plugins, logger=logger)


def check_text(task: Task, estimator: Estimator, name: str) -> None:
    """Refuses a lexical estimator (or lexical candidates) on a task known to have no text."""
    candidates = getattr(estimator, "candidates", None)
    if task.has_text is False and (getattr(estimator, "needs_text", False) or candidates):
        who = f"candidates.retriever={candidates['retriever']}" if candidates else name
        raise ValueError(f"{who} needs the text of training examples and queries, but "
                         f"{type(task).__name__} has none; use a text task (e.g. task=facts or "
                         "task=hf_lm).")


def _choice(group: str) -> str:
    """The config chosen for ``group`` (``wandb``), for messages."""
    try:
        return str(HydraConfig.get().runtime.choices.get(group) or group)
    except ValueError:
        return group


def _score_count(task: Task) -> int:
    """n_queries × n_train where the task knows both up front (else 0)."""
    queries = getattr(task, "query_set", None) or getattr(task, "query_data", None)
    try:
        return len(queries) * task.n_train
    except TypeError:
        return 0


def configured_kinds(cfg: DictConfig, task: Task) -> dict[str, GroundTruth]:
    """Every ground-truth kind this run configures, instantiated (settings validated) and
    checked against the task: ``task`` kinds from ``task.<name>``, ``run`` kinds from their
    top-level block."""
    registered = truth_kinds()
    for name in task.truths:
        if name not in registered or registered[name].scope != "task":
            known = sorted(n for n, k in registered.items() if k.scope == "task")
            raise ValueError(f"task.{name} is neither a setting of {type(task).__name__} nor a "
                             f"ground-truth kind (kinds: {', '.join(known)}); check the key, "
                             "or load the plug-in that registers it (plugins=[module]).")
    kinds = {}
    for name, cls in registered.items():
        if cls.scope == "task":
            settings = task.truths.get(name)
            if not settings:
                continue
        else:
            block = cfg.get(cls.config_key or name)
            settings = OmegaConf.to_container(block, resolve=True) if block is not None else {}
            if not isinstance(settings, dict):
                raise ValueError(f"{cls.config_key or name} must be a mapping of settings, got "
                                 f"{settings!r}")
        kind = cls(**settings)
        kind.check(task)
        kinds[name] = kind
    return kinds


def ground_truth_overrides(cfg: DictConfig) -> list[str]:
    """The overrides of this run that a ground-truth job must repeat (task values, experiment,
    launcher, plug-ins), shell-quoted, and the resolved ``cache_dir``."""
    try:
        hydra_cfg = HydraConfig.get()
        given = [*hydra_cfg.overrides.task, *hydra_cfg.overrides.hydra]
    except ValueError:
        given = []
    keep = [o for o in given if o.startswith(GROUND_TRUTH_PREFIXES)]
    return [*map(shlex.quote, keep), shlex.quote(f"cache_dir={Path(cfg.cache_dir).resolve()}")]


def ground_truth(job: Job, needs: str) -> None:
    """Loads (or computes) every active kind that depends on ``needs``."""
    for name, kind in job.kinds.items():
        if kind.needs == needs and kind.active(job.ctx):
            truth = kind.load(job.ctx)
            if truth is not None:
                job.truths[name] = truth


def model(job: Job) -> None:
    """The attributed model (trained once, cached) and its attribution problem."""
    cfg, task = job.cfg, job.task
    trained, checkpoints = trained_model(task, cfg, Path(cfg.cache_dir))
    problem = task.problem(trained, checkpoints).to(task.device)
    problem.key = problem.key or model_key(task, cfg)
    if task.retrainable and problem.model_factory is None:
        # More models of the same task (TRAK's ensemble), trained once and cached like this one.
        problem.model_factory = lambda seed: trained_model(
            task, cfg, Path(cfg.cache_dir), seed)[0].to(task.device)
    job.problem = job.ctx.problem = problem


def fit(job: Job, shard: int | None = None) -> list[Path]:
    """``estimator.fit``, timed, within the memory budget: a gradient estimator's passes and
    chunks are sized to ``memory_budget_mb`` (default: a fraction of available memory), and
    its fit passes run in shards through the driver when ``factors.num_shards > 1`` (with
    ``shard``: that shard first, for ``stage=factors``). Returns the shard files."""
    estimator, cfg = job.estimator, job.cfg
    sharded = shard is not None or int(cfg.factors.num_shards) > 1
    if isinstance(estimator, GradientEstimator):
        estimator.memory_budget = memory.budget(cfg.get("memory_budget_mb"), job.problem.device)
        if hasattr(estimator, "plan_fit"):
            estimator.plan_fit(job.problem, saved=sharded)
    memory.release(job.problem.device)  # what setting up freed: the baseline is what is held
    baseline = memory.status_bytes("VmRSS")
    if baseline is not None:
        job.metrics["baseline_rss_mb"] = baseline / memory.MB
    reset_peak_rss()  # peak_rss_mb measures fit + score, also inside a multirun
    start = time.perf_counter()
    paths = sharding.fit(job, shard)
    if isinstance(estimator, GradientEstimator):
        memory.release(job.problem.device)  # the fit's transients, before scoring is planned
        estimator.plan_memory(job.problem)
        job.metrics["memory_budget_mb"] = estimator.memory_budget.total_mb
    job.metrics["fit_seconds"] = time.perf_counter() - start
    return paths


def score(job: Job) -> None:
    """``estimator.score``, timed, checked for shape; records the peak memory so far. With
    ``score.num_shards > 1`` (or ``stage=merge``) the scores are the joined shards."""
    start = time.perf_counter()
    if job.cfg.stage == "merge" or int(job.cfg.score.num_shards) > 1:
        on_missing = "error" if job.cfg.stage == "merge" else "compute"
        scores = sharding.merged_scores(job, on_missing)
    else:
        scores = job.estimator.score(job.problem).detach().float().cpu()
    job.metrics["score_seconds"] = time.perf_counter() - start
    job.metrics["peak_rss_mb"] = peak_rss_mb()
    if job.problem.device.type == "cuda":
        job.metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    expected = (job.problem.n_queries, job.problem.n_train)
    if scores.shape != expected:
        raise RuntimeError(f"{job.cfg.estimator_name} returned scores of shape "
                           f"{tuple(scores.shape)}, expected {expected}")
    job.scores = job.ctx.scores = scores
    job.ctx.estimator = job.estimator


def score_shard(job: Job) -> Path:
    """``stage=score``: one shard of the scores, written to the cache."""
    return sharding.score_shard(job, int(job.cfg.score.shard))


def evaluate(job: Job) -> None:
    """The kinds that need the scores, then every metric of the available ground truths,
    the task's own numbers and the estimator's diagnostics."""
    ground_truth(job, "scores")
    metrics, job.per_query = compute_metrics(job.scores, job.truths, job.problem.query_groups)
    costs = job.metrics
    diagnostics = getattr(job.estimator, "diagnostics", None) or {}  # e.g. LiSSA's convergence
    job.metrics = {**metrics, **job.problem.task_metrics, **costs,
                   **{k: float(v) for k, v in diagnostics.items()}}


def ground_truth_shards(job: Job) -> list[Path]:
    """``stage=ground_truth``: one shard of every sharded kind (those that depend on the
    attributed model train it first)."""
    shard, num_shards = job.ctx.options.shard, job.ctx.options.num_shards
    paths = [kind.compute_shard(job.ctx, shard, num_shards) for kind in job.kinds.values()
             if kind.sharded and kind.needs == "task"]
    per_model = [kind for kind in job.kinds.values() if kind.sharded and kind.needs == "model"]
    if per_model:
        model(job)
        paths += [kind.compute_shard(job.ctx, shard, num_shards) for kind in per_model]
    log.info("Ground-truth shard %d/%d written: %s", shard + 1, num_shards,
             ", ".join(map(str, paths)))
    return paths
