"""Sharded stages: factors and scores as jobs give one job's bits; top-k merges; refusals."""

from __future__ import annotations

import pytest
import torch

from bench.cli import run


def _scores(cfg) -> torch.Tensor:
    return torch.load(f"{cfg.hydra.runtime.output_dir}/scores.pt")


@pytest.mark.parametrize("estimator", ["ekfac", "grad_dot"])
def test_three_shard_factors_and_scores_equal_one_job_bitwise(make_cfg, estimator):
    base = (f"estimator={estimator}", "num_threads=1", "memory_budget_mb=2000",
            "estimator.chunk_size=16", *(["estimator.batch_size=16"] if estimator == "ekfac"
                                         else []))
    # the one job keeps no factors, so the sharded jobs below fit theirs from scratch
    one = make_cfg("digits_mlp", *base, *(["estimator.cache_dir=null"] if estimator == "ekfac"
                                          else []))
    record = run(one)
    expected = _scores(one)
    shards = ["factors.num_shards=3", "score.num_shards=3"]
    if estimator == "ekfac":
        for shard in range(3):
            out = run(make_cfg("digits_mlp", *base, *shards, "stage=factors",
                               f"factors.shard={shard}"))
            assert out["stage"] == "factors"
    for shard in range(3):
        out = run(make_cfg("digits_mlp", *base, *shards, "stage=score", f"score.shard={shard}"))
        assert out["stage"] == "score" and len(out["shards"]) == 1
    merge = make_cfg("digits_mlp", *base, *shards, "stage=merge")
    merged = run(merge)
    assert torch.equal(_scores(merge), expected)
    assert merged["lds"] == record["lds"]


def test_top_k_merge_and_missing_shards(make_cfg):
    base = ("estimator=grad_dot", "num_threads=1", "memory_budget_mb=2000",
            "estimator.chunk_size=16")
    full = make_cfg("digits_mlp", *base)
    run(full)
    scores = _scores(full)
    with pytest.raises(ValueError, match="missing shards \\[0, 1\\].*stage=score"):
        run(make_cfg("digits_mlp", *base, "score.num_shards=2", "score.top_k=5",
                     "stage=merge"))
    for shard in range(2):
        run(make_cfg("digits_mlp", *base, "score.num_shards=2", "score.top_k=5",
                     "stage=score", f"score.shard={shard}"))
    merge = make_cfg("digits_mlp", *base, "score.num_shards=2", "score.top_k=5", "stage=merge")
    run(merge)
    top = _scores(merge)
    assert (~top.isnan()).sum(1).tolist() == [5] * scores.shape[0]
    expected = scores.topk(5, dim=1)
    assert torch.equal(top.gather(1, expected.indices), expected.values)


def test_stage_factors_needs_a_sharded_fit(make_cfg):
    with pytest.raises(ValueError, match="stage=factors shards the fit passes"):
        run(make_cfg("digits_mlp", "estimator=grad_dot", "stage=factors"))
    with pytest.raises(ValueError, match="score.shard must be in"):
        run(make_cfg("digits_mlp", "stage=score", "score.shard=2"))
