"""The verified cache: every cached file carries its key, slot and checksum, and each kind of
corruption — of a model, a ground-truth shard, EK-FAC factors and a gradient index — is
detected with a one-line reason and recomputed to the same bytes. Also: factor files are
byte-identical across runs, stale temps are swept in every cache folder, records and
error.json are written atomically."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import ground_truth as gt
from bench.cache import load_checked, save_atomic
from bench.models import model_key, trained_model
from estimators import atomic
from estimators.ekfac import EKFAC
from estimators.index import GradientIndex
from tests.helpers import ground_truth_of

KINDS = ("truncated", "empty", "garbage", "foreign key", "swapped slot", "flipped bit",
         "no checksum")


def corrupt(path: Path, kind: str, other: Path | None = None, tensor: torch.Tensor | None = None):
    """Damages ``path`` in place as ``kind`` says (``other``: a valid file of another key or
    slot; ``tensor``: a tensor whose bytes are in the file)."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind in ("foreign key", "swapped slot"):
        shutil.copyfile(other, path)
    elif kind == "flipped bit":
        raw = tensor.detach().contiguous().numpy().tobytes()
        at = data.find(raw)
        assert at >= 0, "the tensor's bytes are not in the file"
        flipped = bytearray(data)
        flipped[at + len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif kind == "no checksum":
        payload = torch.load(path, weights_only=True)
        torch.save({k: v for k, v in payload.items() if k != "checksum"}, path)
    else:
        raise AssertionError(kind)


def reasons(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "recomputing it" in r.getMessage()]


def assert_one_line_reason(caplog, path: Path) -> str:
    found = [m for m in reasons(caplog) if str(path) in m]
    assert len(found) == 1, reasons(caplog)
    assert "\n" not in found[0] and "Please file an issue" not in found[0]
    caplog.clear()
    return found[0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_corruption_of_a_shard_is_detected_and_recomputed(make_cfg, caplog, kind):
    """A LOO shard (the kind the issue found silently wrong: another slot's shard under this
    name, a flipped bit in its values) is refused and recomputed to the same bytes."""
    caplog.set_level(logging.WARNING)
    ctx, loo, plan = ground_truth_of(make_cfg("digits_logreg", "task.loo.n=4", "task.lds=null",
                                              "task.pbrf=null"), "loo")
    cache = ctx.cache_dir
    work = loo.work(ctx, plan)
    paths = [gt.compute_shard(work, plan, cache, s, 2) for s in range(2)]
    good = [p.read_bytes() for p in paths]
    values = torch.load(paths[0], weights_only=True)["values"]
    foreign = paths[0].with_name("foreign.pt")
    save_atomic({"key": "another-key", "values": values}, foreign)
    corrupt(paths[0], kind, other=paths[1] if kind == "swapped slot" else foreign,
            tensor=values)
    assert plan.load(cache, 0, 2) is None  # detected on load...
    reason = assert_one_line_reason(caplog, paths[0])
    assert not paths[0].exists()  # ...removed...
    if kind == "swapped slot":
        assert "slot" in reason
    if kind == "flipped bit":
        assert "checksum" in reason
    truth = gt.load_or_compute(work, plan, cache, gt.GroundTruthOptions(num_shards=2))
    assert [p.read_bytes() for p in paths] == good  # ...and recomputed identically
    assert truth.values.shape[0] == 4


@pytest.mark.parametrize("kind", KINDS)
def test_every_corruption_of_a_model_file_is_detected_and_retrained(make_cfg, caplog, kind):
    caplog.set_level(logging.WARNING)
    cfg = make_cfg("digits_mlp", "task.epochs=1")
    from hydra.utils import instantiate

    task = instantiate(cfg.task)
    cache = Path(cfg.cache_dir)
    model, _ = trained_model(task, cfg, cache)
    path = cache / "models" / "digits_mlp" / f"{model_key(task, cfg)}.pt"
    good = path.read_bytes()
    other, _ = trained_model(task, cfg, cache, seed=1)
    other_path = path.with_name(f"{model_key(task, cfg, 1)}.pt")
    if kind == "swapped slot":  # the right key, another seed's slot
        payload = torch.load(other_path, weights_only=True)
        save_atomic({**{k: v for k, v in payload.items() if k not in atomic.SEAL},
                     "key": model_key(task, cfg)}, other_path.with_name("swap.pt"), {"seed": 1})
        other_path = other_path.with_name("swap.pt")
    corrupt(path, kind, other=other_path, tensor=next(model.parameters()))
    again, _ = trained_model(task, cfg, cache)
    assert_one_line_reason(caplog, path)
    assert path.read_bytes() == good
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values(), strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_every_corruption_of_factors_is_detected_and_refitted(tiny_mlp, tmp_path, caplog, kind):
    caplog.set_level(logging.WARNING)
    problem, _ = tiny_mlp
    problem.key = "tiny-mlp-verified-factors"
    try:
        EKFAC(cache_dir=str(tmp_path)).fit(problem)
        files = sorted((tmp_path / "factors").glob("*.pt"), key=lambda p: p.stat().st_size)
        good = {p: p.read_bytes() for p in files}
        lam, basis = files  # the eigenvalue file is the smaller one
        payload = torch.load(lam, weights_only=True)
        if kind == "swapped slot":  # this key, but the file says it holds the eigenbasis
            other = tmp_path / "swap.pt"
            atomic.save_checked(payload, other, "kfac eigenbasis")
        else:
            other = basis
        corrupt(lam, kind, other=other, tensor=next(iter(payload["lam"].values())))
        refit = EKFAC(cache_dir=str(tmp_path))
        refit.fit(problem)
        assert_one_line_reason(caplog, lam)
        assert {p: p.read_bytes() for p in files} == good
    finally:
        problem.key = ""


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "foreign key",
                                  "swapped slot", "flipped bit", "no checksum"])
def test_every_corruption_of_a_gradient_index_is_detected_and_rebuilt(tmp_path, caplog, kind):
    caplog.set_level(logging.WARNING)
    rows = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7

    def chunks():
        yield slice(0, 3), rows[:3]
        yield slice(3, 6), rows[3:]

    index = GradientIndex(tmp_path)
    index.build("k", (6, 4), chunks())
    path = index.path("k")
    good = path.read_bytes()
    assert np.array_equal(np.load(path), rows.numpy())  # still a plain .npy for numpy
    other = tmp_path / "other.npy"
    if kind == "foreign key":
        GradientIndex(tmp_path).build("other", (6, 4), chunks())
    elif kind == "swapped slot":  # this key, other rows
        with atomic.array_writer(other, "k", {"rows": 5}, (6, 4)) as out:
            out[:] = rows.numpy()
    if kind == "no checksum":
        np.save(path, rows.numpy())
    else:
        corrupt(path, kind, other=other, tensor=rows)
    assert index.load("k", (6, 4)) is None
    assert_one_line_reason(caplog, path)
    index.load_or_build("k", (6, 4), chunks())
    assert path.read_bytes() == good


def test_factor_files_are_byte_identical_across_runs(tiny_mlp, tmp_path):
    """Fitted twice into two caches (and once more after deleting one), the factor files of
    EK-FAC are the same bytes: no temp name inside the zip records."""
    problem, _ = tiny_mlp
    problem.key = "tiny-mlp-identical-factors"
    try:
        for name in ("a", "b"):
            EKFAC(cache_dir=str(tmp_path / name)).fit(problem)
        a = {p.name: p.read_bytes() for p in (tmp_path / "a" / "factors").glob("*.pt")}
        b = {p.name: p.read_bytes() for p in (tmp_path / "b" / "factors").glob("*.pt")}
        assert len(a) == 2 and a == b
        for path in (tmp_path / "a" / "factors").glob("*.pt"):
            assert b".tmp" not in path.read_bytes()
    finally:
        problem.key = ""


def test_stale_temps_are_swept_in_every_cache_folder(make_cfg, tmp_path):
    """A temp file of a dead writer in any cache folder (models, ground truth, factors,
    gradient indexes) is gone after the next run's resolve; a live writer's stays."""
    from bench import stages

    cfg = make_cfg("digits_mlp")
    cache = Path(cfg.cache_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    folders = ["models/digits_mlp", "ground_truth/digits_mlp/lds-x", "factors", "gradient_index"]
    stale = [cache / f / f".f.pt.{atomic.HOST}.{dead.pid}.0badf00d.tmp" for f in folders]
    live = cache / "factors" / f".g.pt.{atomic.HOST}.{os.getpid()}.cafecafe.tmp"
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    stages.resolve(cfg)
    assert not any(p.exists() for p in stale) and live.exists()


def test_a_writer_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    """Atomic writes: a failure at any step before the rename leaves the previous file (or
    none) and no temp file."""
    path = tmp_path / "f.pt"
    save_atomic({"key": "k", "x": torch.ones(2)}, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(OSError):
        save_atomic({"key": "k", "x": torch.zeros(2)}, path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    assert load_checked(path, "k")["x"].tolist() == [1.0, 1.0]


def test_records_are_written_atomically(tmp_path, monkeypatch):
    """metrics.json, per_query.csv, scores.pt and error.json go through the atomic writer:
    a record interrupted while writing leaves no partial file."""
    from bench import record

    written = []
    real = atomic.write_bytes

    def spy(path, data):
        written.append(Path(path).name)
        real(path, data)

    monkeypatch.setattr(record, "write_bytes", spy)
    monkeypatch.setattr(record, "write_text", lambda p, t: spy(p, t.encode()))
    record.write_records(tmp_path, {"task": "t", "estimator": "e", "seed": 0, "lds": 0.5},
                         {"lds": np.array([0.5, 0.5])}, torch.zeros(2, 3))
    assert written == ["scores.pt", "per_query.csv", "metrics.json"]  # the record file last
    assert not list(tmp_path.glob(".*.tmp"))
    from bench import cli

    assert cli.write_text is atomic.write_text  # error.json too
