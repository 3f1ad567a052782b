"""End-to-end runs through the harness: records, every config in every group, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

from bench.cli import CONF_DIR, run
from bench.errors import user_message
from bench.report.leaderboard import build
from tests.helpers import SHORT, TINY, cli

ESTIMATORS = sorted(p.stem for p in Path(CONF_DIR, "estimator").glob("*.yaml"))
TASKS = sorted(p.stem for p in Path(CONF_DIR, "task").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in Path(CONF_DIR, "logger").glob("*.yaml"))
SPINE_KEYS = {"lds", "lds_sem", "loo_pearson", "loo_spearman", "fit_seconds", "score_seconds",
              "peak_rss_mb", "task", "estimator", "seed"}
REPO = Path(__file__).resolve().parents[2]


def test_records_of_a_run(make_cfg):
    cfg = make_cfg("digits_logreg", "estimator=grad_dot", "seed=2")
    record = run(cfg)
    out = Path(cfg.hydra.runtime.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert SPINE_KEYS <= set(metrics)
    assert (metrics["task"], metrics["estimator"], metrics["seed"]) == ("digits_logreg",
                                                                       "grad_dot", 2)
    assert metrics == json.loads(json.dumps(record, default=str))
    assert metrics["command"].startswith("tda-bench task=digits_logreg")
    assert "torch" in metrics["versions"]
    per_query = pd.read_csv(out / "per_query.csv")
    assert list(per_query.columns) == ["query", "lds", "loo_pearson", "loo_spearman",
                                       "pbrf_pearson", "pbrf_spearman", "top1pct_share"]
    stages = [metrics[f"{s}_seconds"] for s in ("model", "ground_truth", "fit", "score",
                                                 "evaluate")]
    assert min(stages) >= 0 and sum(stages) <= metrics["job_seconds"]
    assert metrics["ground_truth_seconds"] > 0  # LOO, LDS and PBRF retraining, this first time
    assert len(per_query) == 12
    assert per_query["lds"].mean() == pytest.approx(metrics["lds"])
    assert torch.load(out / "scores.pt").shape == (12, 120)


# bm25 needs the training text, trackstar's optimizer correction an Adam-trained model: both
# run on the fact task instead of digits
FACTS_ONLY = {"bm25", "trackstar"}
USER_DATA = {"hf_lm"}  # need a user's model and jsonl files (tests/test_facts.py runs it)
# The peers (estimators/peers/) and their libraries (the optional extra); bergson always
# refuses. They run on the convex task: dattri's Hessian-based peers diverge (LiSSA, Arnoldi)
# on the MLP's indefinite Hessian. Defaults cut short where they are long.
PEER_LIBRARIES = {"kronfluence": "kronfluence", "dattri": "dattri", "traker": "trak",
                  "bergson": None}
PEERS = {e: PEER_LIBRARIES[e.split("_")[0]] for e in ESTIMATORS
         if e.split("_")[0] in PEER_LIBRARIES}
PEER_SHORT = {"dattri_lissa": ["estimator.depth=5", "estimator.power_iterations=2"],
              "dattri_arnoldi": ["estimator.iterations=8", "estimator.rank=4"],
              "dattri_trak": ["estimator.n_models=2", "estimator.regularization=1e-4"],
              "traker": ["estimator.n_models=2"]}


def installed(library: str | None) -> bool:
    try:
        return library is not None and __import__(library) is not None
    except ImportError:
        return False


def run_or_refuse(cfg, estimator: str) -> dict | None:
    """A peer's record, or None after checking its one-sentence refusal: the extra is not
    installed (or the peer is bergson)."""
    if installed(PEERS[estimator]):
        return run(cfg)
    with pytest.raises(Exception) as raised:
        run(cfg)
    refusal = user_message(raised.value)
    expected = "bergson cannot run" if PEERS[estimator] is None else 'pip install -e ".[peers]"'
    assert expected in refusal and refusal.count(". ") == 0, refusal
    return None


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_config_runs_on_a_tiny_task(make_cfg, estimator):
    if estimator in PEERS:
        record = run_or_refuse(make_cfg("digits_logreg", f"estimator={estimator}",
                                        *PEER_SHORT.get(estimator, [])), estimator)
        assert record is None or -1.0 <= record["lds"] <= 1.0
        return
    if estimator in FACTS_ONLY:
        record = run(make_cfg("facts", f"estimator={estimator}"))
        assert 0.0 < record["mrr"] <= 1.0
    else:
        record = run(make_cfg("digits_mlp", f"estimator={estimator}"))
        assert -1.0 <= record["lds"] <= 1.0
    assert record["estimator"] == estimator


# explicit on a language model forms a Jacobian over every token × vocabulary entry; the
# dattri and TRAK peers take per-example gradients with torch.func.vmap, which refuses the
# branches of transformers' attention masks (tests/estimators/test_peers.py checks the
# refusal), and bergson always refuses
FACTS_REFUSED = {"explicit", *(e for e, lib in PEERS.items() if lib != "kronfluence")}


@pytest.mark.parametrize("estimator", sorted(set(ESTIMATORS) - FACTS_ONLY - FACTS_REFUSED))
def test_every_estimator_config_runs_on_a_tiny_language_model(make_cfg, estimator):
    """The fact task's Llama (attention through SDPA) under every estimator's defaults,
    cut short where the default is long: LiSSA's and Arnoldi's curvature products
    differentiate through attention twice."""
    short = SHORT.get(estimator, [])
    if estimator in PEERS:
        record = run_or_refuse(make_cfg("facts", f"estimator={estimator}",
                                        "fact_metrics.with_tail_patch=false"), estimator)
        assert record is None or 0.0 < record["mrr"] <= 1.0
        return
    record = run(make_cfg("facts", f"estimator={estimator}", *short,
                          "fact_metrics.with_tail_patch=false"))
    assert 0.0 < record["mrr"] <= 1.0 and record["estimator"] == estimator


@pytest.mark.parametrize("task", TASKS)
def test_every_task_config_instantiates_with_tiny_overrides(make_cfg, task):
    if task in USER_DATA:
        with pytest.raises(MissingMandatoryValue, match="task.model"):
            instantiate(make_cfg(task).task)
        return
    assert task in TINY, f"add a TINY entry for task {task} in tests/conftest.py"
    instance = instantiate(make_cfg(task).task)
    assert instance.n_train > 0 and instance.ground_truths is not None


@pytest.mark.parametrize("logger", LOGGERS)
def test_every_logger_config_instantiates(make_cfg, logger):
    assert hasattr(instantiate(make_cfg("digits_mlp", f"logger={logger}").logger), "log_run")


def test_wandb_offline_run_is_left_behind(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("digits_mlp", "estimator=grad_dot", "logger=wandb")
    run(cfg)
    runs = list(Path(cfg.hydra.runtime.output_dir, "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))



def test_command_line_run_writes_records(tmp_path):
    out = tmp_path / "run1"
    proc = cli("task=digits_mlp", "estimator=grad_cos", "logger=none", f"hydra.run.dir={out}",
               f"cache_dir={tmp_path / 'cache'}", *TINY["digits_mlp"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lds"] is not None and metrics["lds_sem"] is not None
    assert "digits_mlp / grad_cos / seed 0" in proc.stdout


def test_unknown_estimator_lists_the_available_ones(tmp_path):
    proc = cli("estimator=no_such_method", "logger=none", cwd=tmp_path)
    assert proc.returncode == 2
    assert "estimator=no_such_method is not a config of the estimator group" in proc.stderr
    assert all(name in proc.stderr for name in ESTIMATORS)


def test_user_errors_are_one_sentence_not_a_traceback(tmp_path):
    proc = cli("task=digits_mlp", "estimator=explicit", "estimator.max_params=10",
               "logger=none", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path}",
               *TINY["digits_mlp"], cwd=REPO)
    assert proc.returncode == 2
    assert "tda-bench: error: explicit forms the full" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_failing_job_of_a_sweep_records_its_error_and_the_sweep_goes_on(tmp_path):
    """bm25 refuses a task without text, random is skipped by the sweep's ``skip``; both
    leave error.json, grad_dot still runs, and the leaderboard lists the two under Not run.
    The jobs run two at a time in worker processes (the joblib launcher)."""
    sweep = tmp_path / "sweep"
    proc = cli("-m", "task=digits_mlp", "estimator=bm25,grad_dot,random", "logger=none",
               "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               "skip={digits_mlp/random:not wanted here}",
               f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
               *TINY["digits_mlp"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    errors = {json.loads(p.read_text())["estimator"]: json.loads(p.read_text())["error"]
              for p in sweep.rglob("error.json")}
    assert set(errors) == {"bm25", "random"} and "text" in errors["bm25"]
    assert "digits_mlp/random is skipped by this sweep: not wanted here" in errors["random"]
    assert len(list(sweep.rglob("metrics.json"))) == 1  # grad_dot still ran
    build([sweep], tmp_path / "out", n_boot=10, plots=False)
    table = (tmp_path / "out" / "LEADERBOARD.md").read_text().split("## Not run")[1]
    assert "| digits_mlp | random | 0 | digits_mlp/random is skipped" in table
    assert "| digits_mlp | bm25 | 0 |" in table


def test_a_job_that_crashes_in_a_sweep_leaves_its_traceback(tmp_path):
    """A bug (not a user error) in one job: error.json names it and keeps the traceback, so
    the sweep's table lists it under Not run instead of the job vanishing."""
    sweep = tmp_path / "sweep"
    proc = cli("-m", "task=digits_mlp", "estimator=random", "estimator._target_=builtins.dict",
               "logger=none", f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
               *TINY["digits_mlp"], cwd=REPO)
    errors = [json.loads(p.read_text()) for p in sweep.rglob("error.json")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0]["error"].startswith("AttributeError") and "Traceback" in errors[0]["traceback"]
