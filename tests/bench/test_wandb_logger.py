"""W&B logging read back from the offline run files (``wandb leet inspect``), and the run
records the leaderboard needs (``lds_ceiling``, ``layer_scores.pt``) from a whole tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import run
from bench.loggers import WandbLogger, top_proponents


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def inspect(run_dir: Path, *flags: str) -> str:
    command = [sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(run_dir)]
    return subprocess.run(command,
                          capture_output=True, text=True, check=True, timeout=120).stdout


def test_top_proponents_rows():
    scores = torch.tensor([[0.1, 0.9, -2.0, 0.5], [3.0, 0.0, 1.0, -1.0]])
    columns, rows = top_proponents(scores, 2, ["a", "b", "c", "d"], ["q0", "q1"])
    assert columns == ["query", "rank", "train_index", "score", "query_text", "train_text"]
    assert [r[2] for r in rows] == [1, 3, 0, 2]
    assert rows[0][4:] == ["q0", "b"] and rows[2][4:] == ["q1", "a"]
    columns, rows = top_proponents(scores, 10, None, None)
    assert columns == ["query", "rank", "train_index", "score"] and len(rows) == 8


def test_offline_run_has_summary_table_plots_and_artifact(tmp_path, wandb_env):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40, generator=gen)
    train_text = [f"train document {m}" for m in range(40)]
    metrics = {"lds": 0.5, "lds_sem": 0.1, "fit_seconds": 1.0, "score_seconds": 2.0,
               "loo_pearson": None}
    out = tmp_path / "run"
    out.mkdir()
    WandbLogger(mode="offline", top_k=5, log_scores=True).log_run(
        name="facts/grad_dot/seed0", group="exp", job_type="grad_dot",
        config={"task": {"n_train": 40}, "seed": 0}, metrics=metrics, out_dir=out,
        scores=scores, train_text=train_text, query_text=["q0", "q1", "q2"])
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    state = json.loads(inspect(run_dir, "--summary"))
    assert state["name"] == "facts/grad_dot/seed0" and state["config"]["task.n_train"] == 40
    summary = state["summary"]
    assert summary["lds"] == 0.5 and summary["seconds"] == 3.0 and "loo_pearson" not in summary
    assert summary["top_proponents"]["nrows"] == 15
    assert summary["plots/score_ccdf"]["_type"] == "image-file"
    table = json.loads((run_dir / "files" / summary["top_proponents"]["path"]).read_text())
    first = dict(zip(table["columns"], table["data"][0], strict=True))
    assert first["train_index"] == int(scores[0].argmax())
    assert first["train_text"] == train_text[first["train_index"]] and first["query_text"] == "q0"
    records = [json.loads(line) for line in inspect(run_dir).splitlines()]
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert any(a.get("type") == "scores" for a in artifacts)


def test_score_artifact_respects_size_limit(tmp_path, wandb_env):
    out = tmp_path / "run"
    out.mkdir()
    WandbLogger(mode="offline", top_k=0, plots=False, log_scores=True, max_score_mb=0.0).log_run(
        name="t/e/seed0", group="g", job_type="e", config={}, metrics={"lds": 0.1},
        out_dir=out, scores=torch.zeros(2, 3))
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    summary = json.loads(inspect(run_dir, "--summary"))["summary"]
    assert summary["scores_artifact"].startswith("skipped") and "top_proponents" not in summary
    records = [json.loads(line) for line in inspect(run_dir).splitlines()]
    assert not any(r["artifact"].get("type") == "scores" for r in records
                   if r["type"] == "artifact")


def test_run_records_ceiling_and_layer_scores(make_cfg):
    record = run(make_cfg("digits_mlp", "estimator=grad_dot", "estimator.per_layer=true",
                          "task.lds.seeds=2"))
    assert -1.0 <= record["lds_ceiling"] <= 1.0
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    saved = torch.load(out / "layer_scores.pt", weights_only=True)
    scores = torch.load(out / "scores.pt", weights_only=True)
    assert saved["layer_scores"].shape == (2, *scores.shape) and len(saved["layers"]) == 2
    torch.testing.assert_close(saved["layer_scores"].sum(0), scores, rtol=1e-5, atol=1e-6)


def test_leaderboard_run_on_wandb(tmp_path, wandb_env, monkeypatch):
    from bench.report import leaderboard as lb
    from tests.helpers import write_run

    for seed in (0, 1):
        write_run(tmp_path / "runs", "t", "grad_dot", seed, [0.1 * seed, 0.5, 0.7])
    monkeypatch.chdir(tmp_path)
    lb.main([str(tmp_path / "runs"), "--out", "res", "--no-plots", "--wandb-project", "p"])
    assert not (tmp_path / "res" / "wandb").exists()  # nothing W&B inside the results
    (run_dir,) = (tmp_path / "wandb-home" / "wandb").glob("offline-run-*")
    state = json.loads(inspect(run_dir, "--summary"))
    assert state["name"] == "leaderboard" and state["summary"]["leaderboard"]["nrows"] == 1
