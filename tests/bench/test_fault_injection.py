"""Fault injection: ``kill -9`` of a job while it computes ground truth, trains the
attributed model and fits EK-FAC factors, repeated on one cache: at random moments, and at
the two moments of a write that matter (its temp file complete but not yet renamed; renamed,
the folder not yet synced).

After every kill each cache file that exists passes verification (key and checksum: no half
written or wrong file is ever left where a reader would take it), and once a run completes,
the cache is byte-identical to that of an uninterrupted run (zero silent mismatches). The
job runs in a forked child (a real SIGKILL, without paying the imports again); the many-kill
test is ``slow``, a few kills run in the default suite.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from bench import stages
from estimators import atomic

OVERRIDES = ("estimator=ekfac", "task.pbrf=null", "ground_truth.num_shards=4",
             "ground_truth.vectorise=false", "num_threads=1")


def _job(cfg) -> None:
    """The work a killed job does: LDS shards, the attributed model, EK-FAC's two passes."""
    torch.set_num_threads(1)
    job = stages.resolve(cfg)
    stages.ground_truth(job, "task")
    stages.model(job)
    job.estimator.fit(job.problem)


def _child(cfg, kill_at: tuple[int, str] | None) -> None:
    if kill_at is not None:  # die inside the kill_at[0]-th cache write, at phase kill_at[1]
        replace, calls = os.replace, []

        def dying_replace(src, dst):
            calls.append(dst)
            if len(calls) == kill_at[0] and kill_at[1] == "before rename":
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
            if len(calls) == kill_at[0] and kill_at[1] == "after rename":
                os.kill(os.getpid(), signal.SIGKILL)

        atomic.os.replace = dying_replace
    try:
        _job(cfg)
    except BaseException:  # noqa: BLE001 - the parent sees the exit code
        os._exit(1)
    os._exit(0)


def start(cfg, kill_at: tuple[int, str] | None = None) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=_child, args=(cfg, kill_at))
    process.start()
    return process


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every cache file a reader would open (not temps or locks), by relative path."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.pt"))
            if not p.name.startswith(".")}


def unverified(cache: Path) -> list[str]:
    """The cache files that exist but fail their checksum (or cannot be read)."""
    bad = []
    for path in sorted(cache.rglob("*.pt")):
        if path.name.startswith("."):
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            reason = atomic.check_payload(payload, payload.get("key"))
        except Exception as err:  # noqa: BLE001 - any unreadable file counts
            reason = type(err).__name__
        if reason:
            bad.append(f"{path}: {reason}")
    return bad


def inject(make_cfg, tmp_path: Path, kills: int, seed: int, writes: int = 0) -> dict:
    """Runs the job uninterrupted (the reference); then, on one cache, killed inside each of
    its first ``writes`` cache writes (before and after the rename) and ``kills`` times at a
    random moment; then to completion. Returns what was seen."""
    reference = tmp_path / "reference"
    ref_cfg = make_cfg("digits_mlp", *OVERRIDES, f"cache_dir={reference}")
    began = time.monotonic()
    process = start(ref_cfg)
    process.join()
    duration = time.monotonic() - began
    assert process.exitcode == 0, "the uninterrupted job failed"
    expected = cache_files(reference)
    assert any(k.startswith("factors/") for k in expected) and \
        any(k.startswith("ground_truth/") for k in expected)

    cfg = make_cfg("digits_mlp", *OVERRIDES)
    cache = Path(cfg.cache_dir)
    rng = random.Random(seed)
    seen = {"kills": 0, "write_kills": 0, "completed_early": 0, "temps_left": 0,
            "unverified": [], "mismatches": 0}
    for k in range(1, writes + 1):
        for phase in ("before rename", "after rename"):
            for path in list(cache.rglob("*.pt")):  # the k-th write is the k-th file again
                path.unlink()
            process = start(cfg, (k, phase))
            process.join()
            assert process.exitcode == -signal.SIGKILL, (k, phase)
            seen["write_kills"] += 1
            seen["temps_left"] += len(list(cache.rglob(".*.tmp")))
            seen["unverified"] += unverified(cache)
    while seen["kills"] < kills:
        process = start(cfg)
        time.sleep(rng.uniform(0.05, 0.95) * duration)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            seen["kills"] += 1
        else:
            seen["completed_early"] += 1
            for path in list(cache.rglob("*.pt")):  # start over, so kills keep landing in work
                path.unlink()
        process.join()
        seen["temps_left"] += len(list(cache.rglob(".*.tmp")))
        seen["unverified"] += unverified(cache)
    process = start(cfg)
    process.join()
    assert process.exitcode == 0, "the job did not complete after the kills"
    final = cache_files(cache)
    seen["mismatches"] = sum(final.get(k) != v for k, v in expected.items()) + \
        len(set(final) - set(expected))
    seen["files"] = len(expected)
    seen["temps_after"] = len(list(cache.rglob(".*.tmp")))
    return seen


def check(seen: dict, kills: int, writes: int = 0) -> None:
    print(f"fault injection: {seen}")
    assert seen["kills"] == kills and seen["write_kills"] == 2 * writes
    assert seen["unverified"] == []  # no kill left a file that fails verification
    assert seen["mismatches"] == 0  # the completed cache equals the uninterrupted one
    assert seen["temps_after"] == 0  # the completing run swept the dead writers' temps


def test_a_few_kills_leave_no_wrong_file(make_cfg, tmp_path):
    """Killed inside the first shard's write (both moments) and at 3 random moments."""
    seen = inject(make_cfg, tmp_path, kills=3, seed=0, writes=1)
    check(seen, 3, writes=1)
    assert seen["temps_left"] >= 1  # the kill before the rename left its temp; it was swept


@pytest.mark.slow
def test_many_kills_during_ground_truth_and_factor_fitting(make_cfg, tmp_path):
    """Killed inside each of the 7 cache writes (4 LDS shards, the model, 2 factor passes)
    at both moments, and at 24 random moments (the figures: the printed line)."""
    seen = inject(make_cfg, tmp_path, kills=24, seed=1, writes=7)
    check(seen, 24, writes=7)
