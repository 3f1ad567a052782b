"""The ``tda-bench`` command: one run = (task, estimator, seed) -> metrics.

    task config ──► trained model (cached) ──► AttributionProblem ──► estimator.fit/score
                 └► ground truth (cached, sharded) ─────────────────► metrics ──► records, W&B

The run is a sequence of named stages (:mod:`bench.stages`). ``stage=ground_truth`` computes
one ground-truth shard and stops (for fan-out as jobs); ``stage=all`` (default) runs the whole
benchmark. User errors end in one sentence and exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bench import stages
from bench.ground_truth import GroundTruthMissing
from bench.metrics import is_printed
from bench.record import provenance, write_layer_scores, write_records

log = logging.getLogger("tda-bench")

CONF_DIR = str(resources.files("conf"))
USER_ERRORS = (ValueError, GroundTruthMissing, FloatingPointError, FileNotFoundError)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one benchmark job through its stages and returns its record (also written to
    the run directory); with ``stage=ground_truth``, one shard of each ground truth."""
    job = stages.resolve(cfg)
    if cfg.stage == "ground_truth":
        return {"stage": "ground_truth", "shards": list(map(str, stages.ground_truth_shards(job)))}
    stages.ground_truth(job, "task")
    stages.model(job)
    stages.ground_truth(job, "model")
    stages.fit(job)
    stages.score(job)
    stages.evaluate(job)
    return record(job)


def record(job: stages.Job) -> dict[str, Any]:
    """The record stage: ``metrics.json``, ``per_query.csv``, scores, the logger, the table."""
    cfg = job.cfg
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    result = {"task": cfg.task_name, "estimator": cfg.estimator_name, "seed": int(cfg.seed),
              **job.metrics, **provenance(command_line()),
              **({"plugins": job.plugins} if job.plugins else {})}
    write_records(out_dir, result, job.per_query, job.scores if cfg.save_scores else None)
    if cfg.save_scores and getattr(job.estimator, "layer_scores", None) is not None:
        write_layer_scores(out_dir, job.estimator, job.problem)
    logger = instantiate(cfg.logger)
    logger.log_run(name=job.name, group=cfg.experiment_name or cfg.task_name,
                   job_type=cfg.estimator_name, config=OmegaConf.to_container(cfg, resolve=True),
                   metrics=job.metrics, out_dir=out_dir, scores=job.scores,
                   train_text=job.problem.train_text, query_text=job.problem.query_text)
    print_table(result, out_dir)
    return result


def command_line() -> str:
    """The ``tda-bench`` command that reproduces this job (its overrides)."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        overrides = sys.argv[1:]
    return " ".join(["tda-bench", *overrides])


def print_table(record: dict[str, Any], out_dir: Path) -> None:
    """The run's metrics that their specs print (:func:`bench.metrics.is_printed`), in the
    order the run reported them."""
    lines = [f"{record['task']} / {record['estimator']} / seed {record['seed']}"]
    lines += [f"  {k:<14} {v:>10.4f}" for k, v in record.items()
              if isinstance(v, int | float) and v is not None and is_printed(k)]
    lines.append(f"  records in {out_dir}")
    print("\n".join(lines), flush=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Entry point of the ``tda-bench`` console script."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except Exception as raised:
        err = user_error(raised)
        if err is None:
            if multirun:  # a bug: leave a trace the leaderboard's "Not run" shows, then fail
                log.exception("job failed")
                write_error(cfg, f"{type(raised).__name__}: {raised}", traceback.format_exc())
            raise
        if os.environ.get("TDA_BENCH_DEBUG"):
            raise
        log.error("%s", err)
        print(f"tda-bench: error: {err}", file=sys.stderr)
        if multirun:  # one job of a sweep (e.g. bm25 on a task without text): record why, go on
            write_error(cfg, str(err))
            return
        sys.exit(2)


def user_error(err: Exception) -> Exception | None:
    """The user error in ``err``: itself, or the one a constructor raised while Hydra
    instantiated a config (an invalid estimator setting, a missing optional library)."""
    if isinstance(err, InstantiationException):
        err = err.__cause__
    return err if isinstance(err, USER_ERRORS) else None


def write_error(cfg: DictConfig, error: str, trace: str | None = None) -> None:
    """``error.json`` in the job's folder: what failed and why (and the traceback of a bug)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"task": cfg.task_name, "estimator": cfg.estimator_name, "seed": cfg.seed,
               "error": error, **({"traceback": trace} if trace else {})}
    (out_dir / "error.json").write_text(json.dumps(payload, indent=2) + "\n")


__all__ = ["CONF_DIR", "main", "run", "write_error"]
