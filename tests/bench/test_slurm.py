"""Sweeps through a live SLURM scheduler (``pytest -m slurm``; deselected by default).

Start a cluster first (``scripts/slurm_cluster.sh up``, then ``export SLURM_CONF=...``). The
tests skip when no cluster answers, unless ``TDA_BENCH_REQUIRE_SLURM=1`` (as in CI), where
they fail instead. The cache and sweep directories must be on a filesystem the compute
nodes see: ``pytest``'s temp directory on a single-node cluster, else set
``TDA_BENCH_SLURM_TMP`` to a shared directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import TINY

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
JOB = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
       "hydra.launcher.timeout_min=10"]


def _cluster_problem() -> str | None:
    """Why no usable cluster answers, or None."""
    if not shutil.which("sbatch") or not shutil.which("sacct"):
        return "SLURM client commands are not installed (apt-get install slurm-client)"
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                               timeout=30)
        sacct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"SLURM does not answer ({err})"
    if sinfo.returncode or not {"idle", "mixed", "allocated"} & set(sinfo.stdout.split()):
        return ("no SLURM cluster answers (start one: scripts/slurm_cluster.sh up; export "
                f"SLURM_CONF=...): {sinfo.stderr.strip()[-200:]}")
    if sacct.returncode:
        return f"SLURM accounting (sacct) does not work: {sacct.stderr.strip()[-200:]}"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("TDA_BENCH_REQUIRE_SLURM"):
            pytest.fail(f"TDA_BENCH_REQUIRE_SLURM is set but {problem}")
        pytest.skip(problem)


@pytest.fixture
def shared(tmp_path, cluster):
    """A fresh directory that every node sees."""
    base = os.environ.get("TDA_BENCH_SLURM_TMP")
    directory = Path(base) / f"tda-bench-slurm-test-{uuid.uuid4().hex[:8]}" if base else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    yield directory
    if base:
        shutil.rmtree(directory, ignore_errors=True)


def _bench(*args: str, background: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "bench", *args]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _base(shared: Path, sweep: str, name: str, tiny: list[str]) -> list[str]:
    return ["task=digits_mlp", *tiny, "logger=none", "progress=false",
            f"cache_dir={shared / 'cache'}", f"hydra.sweep.dir={shared / sweep}",
            *JOB, f"hydra.launcher.name={name}"]


def _job_ids(sweep_dir: Path) -> list[str]:
    folders = (sweep_dir / ".submitit").iterdir()
    return sorted(p.name for p in folders if p.is_dir() and "_" in p.name)


def _states(job_ids: list[str]) -> dict[str, str]:
    """The final SLURM states of ``job_ids`` from accounting (a job's result file may appear
    a moment before SLURM marks it finished)."""
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j",
                              ",".join(job_ids)], capture_output=True, text=True, check=True,
                             timeout=60).stdout
        states = {line.split("|")[0]: line.split("|")[1].split()[0]
                  for line in out.splitlines() if line.strip()}
        if not {"PENDING", "RUNNING", "COMPLETING"} & set(states.values()):
            return states
        assert time.monotonic() < deadline, f"jobs still unfinished: {states}"
        time.sleep(1)


def _job_logs(sweep_dir: Path) -> str:
    return "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.*"))


def test_ground_truth_fan_out_then_estimator_sweep(shared):
    start = time.perf_counter()
    name = f"tdab-{uuid.uuid4().hex[:6]}"
    tiny = TINY["digits_mlp"]
    gt = _bench("-m", *_base(shared, "gt", name, tiny), "stage=ground_truth",
                "ground_truth.num_shards=2", "ground_truth.shard=0,1")
    assert gt.returncode == 0, gt.stdout + gt.stderr
    gt_ids = _job_ids(shared / "gt")
    assert len(gt_ids) == 2 and set(_states(gt_ids).values()) == {"COMPLETED"}
    # per kind: the task's LDS shards, and the PBRF shards of the attributed model (seed 0)
    shards = sorted(f"{p.parent.name.split('-')[0]}/{p.name}"
                    for p in (shared / "cache").rglob("shard-*.pt"))
    assert shards == ["lds/shard-0000-of-0002.pt", "lds/shard-0001-of-0002.pt",
                      "pbrf/shard-0000-of-0002.pt", "pbrf/shard-0001-of-0002.pt"]
    fanned_out = time.perf_counter()

    sweep = _bench("-m", *_base(shared, "est", name, tiny), "estimator=grad_dot,grad_cos",
                   "ground_truth.on_missing=error")
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    est_ids = _job_ids(shared / "est")
    assert len(est_ids) == 2 and set(_states(est_ids).values()) == {"COMPLETED"}
    assert "Computing" not in _job_logs(shared / "est")  # the sweep retrained no ground truth
    records = {}
    for metrics in sorted((shared / "est").glob("*/metrics.json")):
        record = json.loads(metrics.read_text())
        records[record["estimator"]] = record
        assert record["task"] == "digits_mlp" and record["seed"] == 0
        assert math.isfinite(record["lds"]) and -1 <= record["lds"] <= 1
        assert {"per_query.csv", "scores.pt"} <= {p.name for p in metrics.parent.iterdir()}
    assert sorted(records) == ["grad_cos", "grad_dot"]
    swept = time.perf_counter()

    # the same job with the local launcher gives the same record
    local = _bench(*_base(shared, "unused", name, tiny)[:-len(JOB) - 1], "estimator=grad_dot",
                   "num_threads=1", "ground_truth.on_missing=error",
                   f"hydra.run.dir={shared / 'local'}")
    assert local.returncode == 0, local.stdout + local.stderr
    record = json.loads((shared / "local" / "metrics.json").read_text())
    assert record["lds"] == pytest.approx(records["grad_dot"]["lds"], abs=1e-9)
    print(f"\nslurm timings: ground-truth fan-out {fanned_out - start:.1f} s, 2-estimator sweep "
          f"{swept - fanned_out:.1f} s, local check {time.perf_counter() - swept:.1f} s")


def test_cancelled_job_is_reported_and_a_rerun_completes_it(shared):
    start = time.perf_counter()
    name = f"tdab-{uuid.uuid4().hex[:6]}"
    tiny = [*TINY["digits_mlp"], "task.epochs=10"]
    args = ["-m", *_base(shared, "gt", name, tiny), "stage=ground_truth",
            "ground_truth.num_shards=2", "ground_truth.shard=0,1"]
    sweep = _bench(*args, background=True)
    victim = _wait_until_running(name, task=1)
    subprocess.run(["scancel", victim], check=True, timeout=60)
    out, _ = sweep.communicate(timeout=TIMEOUT_S)
    cancelled = time.perf_counter()
    assert sweep.returncode == 1, out
    assert "Traceback" not in out
    assert f"job {victim} CANCELLED" in out, out
    assert "1 of 2 SLURM job(s) did not complete" in out, out
    assert _states([victim])[victim] == "CANCELLED"
    shard_dir = next(p for p in (shared / "cache").rglob("shard-0000-of-0002.pt")
                     if p.parent.name.startswith("lds-")).parent
    assert not (shard_dir / "shard-0001-of-0002.pt").exists()
    assert not list(shard_dir.glob(".*.tmp")) or _temp_files_belong_to_dead_writers(shard_dir)
    kept = (shard_dir / "shard-0000-of-0002.pt").stat().st_mtime_ns

    rerun = _bench(*args)  # the same command
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (shard_dir / "shard-0001-of-0002.pt").exists()
    assert (shard_dir / "shard-0000-of-0002.pt").stat().st_mtime_ns == kept
    logs = _job_logs(shared / "gt")
    assert logs.count("Computing lds shard 1/2") == 1  # only in the first sweep
    print(f"\nslurm timings: sweep with a cancelled job {cancelled - start:.1f} s, "
          f"rerun {time.perf_counter() - cancelled:.1f} s")


def _wait_until_running(name: str, task: int) -> str:
    """The id of array task ``task`` of the job named ``name``, once it is RUNNING."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True,
                             text=True, timeout=60).stdout
        for line in out.splitlines():
            job_id, state = line.split()
            if job_id.endswith(f"_{task}") and state == "RUNNING":
                return job_id
        time.sleep(0.2)
    raise AssertionError(f"job {name} task {task} never ran")


def _temp_files_belong_to_dead_writers(directory: Path) -> bool:
    """A job killed mid-write may leave a hidden temp file; it must never look like a shard."""
    return all(p.name.endswith(".tmp") and p.name.startswith(".") for p in directory.iterdir()
               if not p.name.startswith("shard-") and not p.name.endswith(".lock"))


@pytest.mark.timeout(1800)
def test_sharded_factors_scores_and_merge_equal_one_job_bitwise(shared):
    """A 3-job array of stage=factors (covariance shards, one eigendecomposition, eigenvalue
    shards), a 3-job array of stage=score and a stage=merge job give one local job's scores
    bit for bit."""
    import torch

    start = time.perf_counter()
    name = f"tdab-{uuid.uuid4().hex[:6]}"
    tiny = TINY["digits_mlp"]
    common = ["estimator=ekfac", "estimator.batch_size=16", "estimator.chunk_size=16",
              "memory_budget_mb=1000", "factors.num_shards=3", "score.num_shards=3"]
    factors = _bench("-m", *_base(shared, "factors", name, tiny), *common, "stage=factors",
                     "factors.shard=0,1,2")
    assert factors.returncode == 0, factors.stdout + factors.stderr
    factor_ids = _job_ids(shared / "factors")
    assert len(factor_ids) == 3 and set(_states(factor_ids).values()) == {"COMPLETED"}
    passes = sorted(p.parent.name.split("-")[1] for p in
                    (shared / "cache" / "factors").rglob("shard-*-of-0003.pt"))
    assert passes == ["covariance"] * 3 + ["eigenvalues"] * 3
    scores = _bench("-m", *_base(shared, "score", name, tiny), *common, "stage=score",
                    "score.shard=0,1,2")
    assert scores.returncode == 0, scores.stdout + scores.stderr
    score_ids = _job_ids(shared / "score")
    assert len(score_ids) == 3 and set(_states(score_ids).values()) == {"COMPLETED"}
    assert "Computing ekfac-" not in _job_logs(shared / "score")  # score jobs fitted nothing
    merge = _bench("-m", *_base(shared, "merge", name, tiny), *common, "stage=merge")
    assert merge.returncode == 0, merge.stdout + merge.stderr
    merged = next((shared / "merge").glob("*/scores.pt"))
    sharded = time.perf_counter()

    # one local job on the same trained model, with its own cache (no shards, no factors; no
    # ground truth: only the scores are compared), the same thread count and memory budget
    shutil.copytree(shared / "cache" / "models", shared / "one" / "models")
    local = _bench("task=digits_mlp", *tiny, "task.lds=null", "task.pbrf=null", "logger=none",
                   "progress=false", *common[:4], "num_threads=1", f"cache_dir={shared / 'one'}",
                   f"hydra.run.dir={shared / 'local'}")
    assert local.returncode == 0, local.stdout + local.stderr
    one = torch.load(shared / "local" / "scores.pt")
    assert torch.equal(torch.load(merged), one)
    print(f"\nslurm timings: 3-shard factors + score + merge {sharded - start:.1f} s, one local "
          f"job {time.perf_counter() - sharded:.1f} s")
