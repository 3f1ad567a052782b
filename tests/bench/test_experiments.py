"""Every experiment file is one command: it composes, names only existing configs, and runs
end to end (shrunk to one tiny job) into its own results table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from bench.cli import CONF_DIR
from tests.helpers import SHORT, TINY

EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))
REPO = Path(__file__).resolve().parents[2]


def sweep_params(name: str) -> dict[str, list[str]]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.callbacks.leaderboard.out.startswith("results")
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_names_existing_configs(name):
    params = sweep_params(name)
    for group in ("task", "estimator"):
        for option in params[group]:
            assert Path(CONF_DIR, group, f"{option}.yaml").exists(), (name, group, option)
    assert params["seed"] == ["0", "1", "2"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_end_to_end_shrunk(name, tmp_path):
    params = sweep_params(name)
    task = params["task"][-1]  # the fact task where there is one: the costlier path
    first = {k: (task if k == "task" else v[0]) for k, v in params.items()}
    first.update(o.split("=") for o in SHORT.get(first["estimator"], []))  # in the job's params
    one_job = ["++hydra.sweeper.params={" + ",".join(f"{k}:'{v}'" for k, v in first.items()) + "}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", f"experiment={name}", f"task={task}", *one_job, *TINY[task],
         "logger=none", f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"hydra.callbacks.leaderboard.out={tmp_path / 'results'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "sweep").rglob("metrics.json"))) == 1, proc.stderr[-3000:]
    table = (tmp_path / "results" / "LEADERBOARD.md").read_text()
    assert params["estimator"][0] in table
