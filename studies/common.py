"""What every study shares: composing a run config, the attributed problem of a task, and
one ``python -m bench`` job as a subprocess (so each job's peak memory is its own)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from bench.cli import CONF_DIR
from bench.models import trained_model


def compose(overrides: list[str], output_dir: str | Path | None = None) -> DictConfig:
    """The run config of ``overrides`` with HydraConfig set, as ``python -m bench`` has it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or tempfile.mkdtemp())
    HydraConfig.instance().set_config(cfg)
    return cfg


def trained_problem(overrides: list[str]):
    """``(problem, task, cfg)``: the attributed model of ``overrides`` (trained once, cached
    under ``cache_dir``) as an attribution problem."""
    cfg = compose(overrides)
    task = instantiate(cfg.task, device=cfg.device)
    model, checkpoints = trained_model(task, cfg, Path(cfg.cache_dir))
    return task.problem(model, checkpoints).to(task.device), task, cfg


@dataclass
class Result:
    """One ``python -m bench`` subprocess: its status and what it recorded."""

    status: str  # ok | na (the harness refused in one sentence) | timeout | error
    wall: float = 0.0
    record: dict = field(default_factory=dict)
    reason: str = ""
    n_train: int | None = None
    n_queries: int | None = None


def run_bench(overrides: list[str], out_dir: Path, cache_dir: Path | None = None,
              timeout: float | None = None) -> Result:
    """Runs ``python -m bench`` with ``overrides`` (one thread, W&B off) into ``out_dir``;
    reads its ``metrics.json`` and the shape of ``scores.pt``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HYDRA_FULL_ERROR": "1"}  # a crash's traceback ends with the exception's line
    command = [sys.executable, "-m", "bench", *overrides, f"hydra.run.dir={out_dir}",
               *([f"cache_dir={cache_dir}"] if cache_dir is not None else [])]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result("timeout", time.perf_counter() - start, reason=f"> {timeout:g} s")
    wall = time.perf_counter() - start
    errors = [line.split("tda-bench: error:", 1)[1].strip()
              for line in done.stderr.splitlines() if "tda-bench: error:" in line]
    if done.returncode == 2 and errors:
        return Result("na", wall, reason=errors[-1])
    if done.returncode != 0 or not (Path(out_dir) / "metrics.json").exists():
        return Result("error", wall, reason=f"exit {done.returncode}: {exception(done.stderr)}")
    result = Result("ok", wall, record=json.loads((Path(out_dir) / "metrics.json").read_text()))
    if (Path(out_dir) / "scores.pt").exists():
        import torch

        result.n_queries, result.n_train = torch.load(Path(out_dir) / "scores.pt").shape
    return result


def exception(stderr: str) -> str:
    """The last ``SomeError: message`` line of a traceback (else the last line)."""
    lines = stderr.strip().splitlines() or ["no output"]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (raised or lines)[-1]
