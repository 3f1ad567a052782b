"""Ground-truth caching, sharding, corruption and interruption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import bench.ground_truth as gt
from bench.cache import load_checked, save_atomic, sweep_stale_temp_files
from bench.cli import run
from tests.helpers import ground_truth_of


def lds_plan(cfg):
    return ground_truth_of(cfg, "lds")


def test_second_run_retrains_nothing(make_cfg, monkeypatch):
    first = run(make_cfg("digits_mlp", "estimator=grad_dot"))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run must not train")

    monkeypatch.setattr("tasks.digits.DigitsTask.fit", no_training)
    second = run(make_cfg("digits_mlp", "estimator=grad_cos", "seed=0"))
    assert second["lds"] != first["lds"]  # another estimator, same cached ground truth


def test_ground_truth_is_shared_by_seeds_and_estimators(make_cfg):
    a = lds_plan(make_cfg("digits_mlp", "seed=0", "estimator=grad_dot"))[2]
    b = lds_plan(make_cfg("digits_mlp", "seed=3", "estimator=explicit"))[2]
    c = lds_plan(make_cfg("digits_mlp", "task.split_seed=1"))[2]
    assert a.key == b.key != c.key


def test_shards_equal_the_unsharded_result(make_cfg, tmp_path):
    cfg = make_cfg("digits_mlp")
    ctx, kind, plan = lds_plan(cfg)
    cache = Path(cfg.cache_dir)
    gt.compute_shard(kind.work(ctx, plan), plan, cache, 0, 1)
    whole = kind.assemble(ctx, plan, gt.join(plan, cache, 1))
    for shard in range(3):
        gt.compute_shard(kind.work(ctx, plan), plan, cache, shard, 3)
    sharded = kind.assemble(ctx, plan, gt.join(plan, cache, 3))
    torch.testing.assert_close(sharded["outputs"], whole["outputs"], rtol=1e-6, atol=0)
    assert whole["values"].shape == (8, 1, 12) and whole["masks"].shape == (8, 120)
    assert whole["masks"].sum(1).eq(60).all()


def test_missing_shards_are_listed_with_the_command(make_cfg):
    cfg = make_cfg("digits_mlp")
    ctx, kind, plan = lds_plan(cfg)
    gt.compute_shard(kind.work(ctx, plan), plan, Path(cfg.cache_dir), 1, 3)
    options = gt.GroundTruthOptions(num_shards=3, on_missing="error")
    with pytest.raises(gt.GroundTruthMissing) as err:
        gt.load_or_compute(kind.work(ctx, plan), plan, Path(cfg.cache_dir), options)
    assert "missing shards [0, 2] of 3" in str(err.value)
    assert "stage=ground_truth task=digits_mlp ground_truth.num_shards=3" in str(err.value)


def test_corrupt_shard_is_detected_and_recomputed(make_cfg, caplog):
    cfg = make_cfg("digits_mlp")
    ctx, kind, plan = lds_plan(cfg)
    path = gt.compute_shard(kind.work(ctx, plan), plan, Path(cfg.cache_dir), 0, 1)
    good = torch.load(path, weights_only=True)["values"]
    path.write_bytes(path.read_bytes()[:100])  # truncated, as after a crash of a naive writer
    again = gt.load_or_compute(kind.work(ctx, plan), plan, Path(cfg.cache_dir),
                               gt.GroundTruthOptions())
    assert "corrupt" in caplog.text
    torch.testing.assert_close(again.values.flatten(), good.flatten())


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "shard.pt"
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt  # interrupted after the bytes hit the temp file

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"key": "k", "x": torch.ones(3)}, target)
    assert list(tmp_path.iterdir()) == []


def test_temp_files_of_dead_writers_are_swept(tmp_path):
    save_atomic({"key": "k"}, tmp_path / "a.pt")
    from bench.cache import _HOST

    dead = tmp_path / f".b.pt.{_HOST}.999999999.deadbeef.tmp"
    live = tmp_path / f".c.pt.{_HOST}.{os.getpid()}.cafecafe.tmp"
    dead.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    assert sweep_stale_temp_files(tmp_path) == 1
    assert not dead.exists() and live.exists()
    assert load_checked(tmp_path / "a.pt", "k")["key"] == "k"
    assert load_checked(tmp_path / "a.pt", "other") is None  # foreign key: treated as corrupt
