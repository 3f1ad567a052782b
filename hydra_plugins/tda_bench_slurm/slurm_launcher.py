"""The ``hydra/launcher=slurm`` launcher: hydra-submitit-launcher's, reporting like a person.

hydra-submitit-launcher submits every job of a sweep as one SLURM job array and then waits
on the jobs in order, raising a traceback at the first one that failed while the others
may still run. This subclass submits the same way, then waits for *every* job, polling the
scheduler (``sacct``) at least every ``poll_s`` seconds so a cancelled or killed job is seen
promptly, and ends with one summary: which jobs completed, which did not (SLURM state and
the job's own error message, deduplicated), and how to resume (rerun the same command:
trained models and ground-truth shards are cached, so only lost work is redone). The sweep
exits with status 1 if any job failed. Without ``sbatch`` on PATH it refuses before
submitting anything (one sentence, exit 2).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

POLL_S = 10.0  # ask the scheduler about unfinished jobs at least this often
ERROR_PREFIX = "tda-bench: error:"


class SlurmLauncher(_SubmititSlurmLauncher):
    """``submitit_slurm`` with a full wait and a readable failure report."""

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        if shutil.which("sbatch") is None:  # before any job is submitted: one sentence, exit 2
            raise ValueError("hydra/launcher=slurm submits jobs with sbatch, which is not on "
                             "PATH here; run the sweep on a SLURM login node, or drop "
                             "hydra/launcher=slurm to run it locally")
        jobs, labels = self._submit(job_overrides, initial_job_idx)
        log.info("Submitted %d SLURM job(s): %s", len(jobs), ", ".join(j.job_id for j in jobs))
        _wait_all(jobs)
        returns, failures = [], []
        for job, label in zip(jobs, labels, strict=True):
            try:
                returns.append(job.results()[0])
            except Exception as err:  # noqa: BLE001 - every failure kind is reported the same way
                failures.append((job, label, _job_error(job, err)))
        if failures:
            print(_report(failures, len(jobs), Path(str(self.config.hydra.sweep.dir))),
                  file=sys.stderr, flush=True)
            sys.exit(1)
        return returns

    def _submit(self, job_overrides, initial_job_idx: int) -> tuple[list[Any], list[str]]:
        """Submits the sweep as one job array (as hydra-submitit-launcher does)."""
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder"),
                "slurm_max_num_timeout": params.pop("max_num_timeout")}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        job_params, labels = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            label = f"#{idx} : {' '.join(filter_overrides(overrides))}"
            log.info("\t%s", label)
            labels.append(label)
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                               Singleton.get_state()))
        return executor.map_array(self, *zip(*job_params, strict=True)), labels


def _wait_all(jobs: list[Any], poll_s: float = POLL_S) -> None:
    """Blocks until every job has finished, asking the scheduler every ``poll_s`` seconds
    (one ``sacct`` call refreshes the state of every job of the sweep)."""
    last_poll = time.monotonic()
    while True:
        pending = [job for job in jobs if not job.done()]
        if not pending:
            return
        if time.monotonic() - last_poll >= poll_s:
            last_poll = time.monotonic()
            pending[0].done(force_check=True)
        time.sleep(1.0)


def _job_error(job: Any, err: Exception) -> str:
    """The job's own error message (``tda-bench: error: ...``), else the end of its stderr."""
    try:
        stderr = job.stderr() or ""
    except OSError:
        stderr = ""
    lines = [line.rstrip() for line in stderr.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith(ERROR_PREFIX):
            block = [line]
            for more in lines[i + 1:]:
                if more.startswith(("srun:", "[", "submitit ", "Traceback", "slurmstepd")):
                    break
                block.append(more)
            return "\n".join(block)
    tail = [line for line in lines if line.strip() and not line.startswith("srun:")][-3:]
    if tail:
        return "\n".join(tail)
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


def _report(failures: list[tuple[Any, str, str]], n_jobs: int, sweep_dir: Path) -> str:
    """One summary of the failed jobs, grouping those that failed with the same message."""
    lines = [f"tda-bench: {len(failures)} of {n_jobs} SLURM job(s) did not complete "
             f"(sweep dir {sweep_dir}):"]
    by_message: dict[str, list[str]] = {}
    for job, label, message in failures:
        state = _state(job)
        lines.append(f"  job {job.job_id} {state}: {label}")
        by_message.setdefault(message, []).append(job.job_id)
    for message, ids in by_message.items():
        lines.append(f"  job {', '.join(ids)} said:")
        lines.extend(f"    {line}" for line in message.splitlines())
    lines.append(f"  logs: {sweep_dir / '.submitit'}/<job id>/")
    done = n_jobs - len(failures)
    lines.append(f"The {done} completed job(s) wrote their records. To finish, rerun the same "
                 "command: trained models and ground-truth shards come from the cache, so only "
                 "lost work is recomputed.")
    return "\n".join(lines)


def _state(job: Any) -> str:
    try:
        return str(job.state)
    except Exception:  # noqa: BLE001 - the report must not fail on an unreadable state
        return "UNKNOWN"
