"""Ground-truth shards under concurrency and faults, with real processes.

* the bytes of a cache file depend only on its payload (so a recomputed file is identical);
* a ground-truth job SIGKILLed mid-shard leaves no shard file, and a rerun computes only the
  missing shard and leaves a cache byte-identical to an uninterrupted run;
* two jobs started on the same shard at once: one computes it, the other waits for the lock
  and reuses the file;
* a run with missing shards and ``on_missing=error`` exits with the list and the command.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import cache
from bench import ground_truth as gt
from tests.helpers import TINY, ground_truth_of

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
# Long enough sequential retraining that a kill lands mid-shard (vectorised, a tiny shard
# finishes within the kill's delay); the in-process reference uses the same path, so the
# bytes compare.
SLOW = ("task.epochs=100", "ground_truth.vectorise=false")


def _command(cache_dir: Path, run_dir: Path, *overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "-m", "bench", *(["-m"] if multirun else []), "task=digits_mlp",
            *TINY["digits_mlp"], *SLOW, "logger=none", "progress=false", f"cache_dir={cache_dir}",
            f"hydra.run.dir={run_dir}",
            f"hydra.sweep.dir={run_dir}", *overrides]


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("SLURM_CPUS_PER_TASK", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, needle: str) -> list[str]:
    """Reads ``proc``'s output until a line contains ``needle``; returns the lines read."""
    lines = []
    deadline = time.monotonic() + TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
        assert time.monotonic() < deadline, f"timed out waiting for {needle!r}"
    raise AssertionError(f"process ended before printing {needle!r}:\n{''.join(lines)}")


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, out
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def tiny_plan(make_cfg):
    """``(ctx, kind, plan)`` of the tiny digits_mlp LDS ground truth (8 retrainings)."""
    return ground_truth_of(make_cfg("digits_mlp", *SLOW), "lds")


def sequential(ctx, kind, plan):
    """The LDS work without the vectorised ensemble (one model at a time)."""
    return kind.work(dataclasses.replace(ctx, options=gt.GroundTruthOptions(vectorise=False)),
                     plan)


def test_saved_bytes_depend_only_on_payload(tmp_path):
    payload = {"key": "k", "units": torch.arange(3), "values": torch.randn(3, 4)}
    cache.save_atomic(payload, tmp_path / "a.pt")
    cache.save_atomic(payload, tmp_path / "sub" / "other-name.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "other-name.pt").read_bytes()
    assert torch.equal(cache.load_checked(tmp_path / "a.pt", "k")["values"], payload["values"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_lock_excludes_a_second_holder(tmp_path):
    target = tmp_path / "x.pt"
    with cache.cache_lock(target) as first:
        assert first
        with cache.cache_lock(target, blocking=False) as second:
            assert not second
    with cache.cache_lock(target, blocking=False) as again:
        assert again


def test_killed_mid_shard_rerun_is_byte_identical(tmp_path, tiny_plan):
    ctx, kind, plan = tiny_plan
    reference = tmp_path / "reference"
    for shard in range(2):
        gt.compute_shard(sequential(ctx, kind, plan), plan, reference, shard, 2)

    cache_dir = tmp_path / "cache"
    cmd = _command(cache_dir, tmp_path / "runs", "stage=ground_truth",
                   "ground_truth.num_shards=2", "ground_truth.shard=0,1", multirun=True)
    victim = _start(cmd)
    _wait_for_line(victim, "Computing lds shard 2/2")  # logged before its ~1 s of retraining
    time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=TIMEOUT_S)
    shard_dir = plan.directory(cache_dir)
    assert sorted(p.name for p in shard_dir.glob("shard-*")) == ["shard-0000-of-0002.pt"], \
        "the victim should have been killed while computing shard 2/2"
    first = (shard_dir / "shard-0000-of-0002.pt").stat()
    # a writer that died mid-write leaves only a hidden temp file; the rerun sweeps it
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = shard_dir / f".shard-0001-of-0002.pt.{cache._HOST}.{dead.pid}.0badf00d.tmp"
    partial.write_bytes(b"half a file")

    out = _finish(_start(cmd))
    assert "Computing lds shard 2/2" in out and "Computing lds shard 1/2" not in out
    again = (shard_dir / "shard-0000-of-0002.pt").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert not partial.exists()
    assert _files(shard_dir) == _files(plan.directory(reference))


def test_concurrent_jobs_compute_a_shard_once(tmp_path, tiny_plan):
    ctx, kind, plan = tiny_plan
    cache_dir = tmp_path / "cache"
    shard_path = plan.shard_path(cache_dir, 1, 2)
    overrides = ("stage=ground_truth", "ground_truth.num_shards=2", "ground_truth.shard=1")
    with cache.cache_lock(shard_path):  # hold the shard until both jobs are waiting for it
        jobs = [_start(_command(cache_dir, tmp_path / name, *overrides)) for name in "ab"]
        heads = ["".join(_wait_for_line(job, "Waiting for lds shard 2/2")) for job in jobs]
    outs = [head + _finish(job) for head, job in zip(heads, jobs, strict=True)]
    assert sum("Computing lds shard 2/2" in out for out in outs) == 1, outs
    assert sum("lds shard 2/2 was computed by another job" in out for out in outs) == 1, outs
    # the stage goes on to the PBRF shard, which either job may reach first: one computes it
    assert sum("Computing pbrf shard 2/2" in out for out in outs) == 1, outs

    shard_dir = plan.directory(cache_dir)
    assert [p.name for p in shard_dir.glob("shard-*")] == ["shard-0001-of-0002.pt"]
    assert not list(shard_dir.glob(".*.tmp"))
    reference = gt.compute_shard(sequential(ctx, kind, plan), plan, tmp_path / "reference", 1, 2)
    assert shard_path.read_bytes() == reference.read_bytes()


def test_missing_shards_stop_with_the_list_and_command(tmp_path, capsys, monkeypatch):
    from bench.cli import main

    cache_dir = tmp_path / "cache"
    argv = _command(cache_dir, tmp_path / "run", "estimator=grad_dot",
                    "ground_truth.on_missing=error", "ground_truth.num_shards=3")[3:]
    monkeypatch.setattr(sys, "argv", ["tda-bench", *argv])
    monkeypatch.delenv("TDA_BENCH_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "missing shards [0, 1, 2] of 3" in err
    assert ("tda-bench -m stage=ground_truth task=digits_mlp task.n_train=120 task.n_queries=12"
            in err)
    assert f"cache_dir={cache_dir} ground_truth.num_shards=3 ground_truth.shard=0,1,2" in err


def test_an_incomplete_split_is_completed_and_any_split_gives_the_same_truth(tmp_path, tiny_plan):
    ctx, kind, plan = tiny_plan
    cache_dir = tmp_path / "cache"
    work = kind.work(ctx, plan)
    first = gt.compute_shard(work, plan, cache_dir, 0, 4)
    stamp = first.stat().st_mtime_ns
    with pytest.raises(gt.GroundTruthMissing, match=r"missing shards \[1, 2, 3\] of 4"):
        gt.load_or_compute(work, plan, cache_dir, gt.GroundTruthOptions(on_missing="error"))
    truth = gt.load_or_compute(work, plan, cache_dir, gt.GroundTruthOptions())  # 1 shard asked
    assert first.stat().st_mtime_ns == stamp  # finished shards are never redone
    assert sorted(p.name for p in plan.directory(cache_dir).glob("shard-*")) == [
        f"shard-{s:04d}-of-0004.pt" for s in range(4)]
    whole = gt.load_or_compute(work, plan, tmp_path / "one-shard", gt.GroundTruthOptions())
    assert torch.equal(truth.values, whole.values)
    assert torch.equal(kind.assemble(ctx, plan, truth)["masks"],
                       kind.assemble(ctx, plan, whole)["masks"])
