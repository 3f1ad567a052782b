"""The ``tda-bench`` command: one run = (task, estimator, seed) -> metrics.

    task config ──► trained model (cached) ──► AttributionProblem ──► estimator.fit/score
                 └► ground truth (cached, sharded) ─────────────────► metrics ──► records, W&B

The run is a sequence of named stages (:mod:`bench.stages`). ``stage=ground_truth`` computes
one ground-truth shard and stops (for fan-out as jobs), ``stage=factors`` one shard of the
estimator's fit passes, ``stage=score`` one shard of the scores; ``stage=merge`` joins score
shards and finishes the job; ``stage=all`` (default) runs the whole benchmark. Every user
error — a bad value, file or path, a mistyped key, an unknown config, a missing extra, a full
disk, out of memory — ends in one sentence and exit 2, whether Hydra meets it while composing
or the run while resolving (:mod:`bench.errors`); in a sweep, the job writes ``error.json``
and the sweep goes on. Programming errors keep their traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bench import stages
from bench.errors import boundary, debugging, report, user_message
from bench.metrics import is_printed
from bench.record import provenance, write_layer_scores, write_records
from estimators.atomic import write_text
from estimators.base import Estimator

log = logging.getLogger("tda-bench")

CONF_DIR = str(resources.files("conf"))
PROG = "tda-bench"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one benchmark job through its stages and returns its record (also written to
    the run directory); with ``stage=ground_truth``, one shard of each ground truth."""
    start = time.perf_counter()
    job = stages.resolve(cfg)
    if cfg.stage == "ground_truth":
        return {"stage": "ground_truth", "shards": list(map(str, stages.ground_truth_shards(job)))}
    if cfg.stage in ("factors", "score"):  # one shard of the fit passes, or of the scores
        stages.model(job)
        if cfg.stage == "factors":
            if type(job.estimator).fit_passes is Estimator.fit_passes:
                raise ValueError(f"stage=factors shards the fit passes of kfac and ekfac; "
                                 f"{cfg.estimator_name} has none to shard (run stage=score).")
            return {"stage": "factors",
                    "shards": list(map(str, stages.fit(job, int(cfg.factors.shard))))}
        stages.fit(job)
        return {"stage": "score", "shards": [str(stages.score_shard(job))]}
    clock = StageClock(start)
    with clock("ground_truth"):
        stages.ground_truth(job, "task")
    with clock("model"):
        stages.model(job)
    with clock("ground_truth"):
        stages.ground_truth(job, "model")
    stages.fit(job)
    stages.score(job)
    with clock("evaluate"):  # the kinds that need the scores (tail-patch), then the metrics
        stages.evaluate(job)
    job.metrics.update(clock.seconds())
    return record(job)


class StageClock:
    """Wall seconds per stage of one job (``model_seconds``, ``ground_truth_seconds``,
    ``evaluate_seconds``) and of the whole job from its start (``job_seconds``, imports not
    counted): where a sweep's time goes (``python -m studies.sweep_profile``)."""

    def __init__(self, start: float) -> None:
        self.start, self.totals = start, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - begin

    def seconds(self) -> dict[str, float]:
        return {**{f"{k}_seconds": v for k, v in self.totals.items()},
                "job_seconds": time.perf_counter() - self.start}


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
    logger = job.logger if job.logger is not None else instantiate(cfg.logger)
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


def main() -> None:
    """Entry point of the ``tda-bench`` console script: Hydra inside the error boundary, so
    an error met while composing the config (an unknown group value, a mistyped key) is one
    sentence and exit 2 like one met by the run."""
    with boundary(PROG):
        job()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def job(cfg: DictConfig) -> None:
    """One job: :func:`run` with its user errors reported (in a sweep, also recorded)."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except Exception as err:
        message = None if debugging() else user_message(err)
        if message is None:
            if multirun:  # a bug: leave a trace the leaderboard's "Not run" shows, then fail
                log.exception("job failed")
                write_error(cfg, f"{type(err).__name__}: {err}", traceback.format_exc())
            raise
        log.error("%s", message)
        report(PROG, message)
        if multirun:  # one job of a sweep (e.g. bm25 on a task without text): record why, go on
            write_error(cfg, message)
            return
        sys.exit(2)


def write_error(cfg: DictConfig, error: str, trace: str | None = None) -> None:
    """``error.json`` in the job's folder (written atomically): what failed and why (and the
    traceback of a bug)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    payload = {"task": _plain(cfg, "task_name"), "estimator": _plain(cfg, "estimator_name"),
               "seed": _plain(cfg, "seed"), "error": error,
               **({"traceback": trace} if trace else {})}
    write_text(out_dir / "error.json", json.dumps(payload, indent=2) + "\n")


def _plain(cfg: DictConfig, key: str) -> Any:
    """A config value for a record, or its text where it does not resolve or is not JSON."""
    try:
        value = cfg[key]
    except Exception:  # noqa: BLE001 - a broken value must not hide the error being recorded
        return None
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


__all__ = ["CONF_DIR", "job", "main", "run", "write_error"]
