"""Experiment loggers, chosen by the ``logger`` config group (``wandb`` or ``none``).

A logger receives one finished run: its name ``{task}/{estimator}/seed{seed}``, group (the
experiment, else the task), job type (the estimator), the resolved config flattened to
dotted keys (so dashboards can filter by any field) and the metrics for the run summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class NoLogger:
    """Logs nothing (``logger=none``); the JSON records are still written."""

    def log_run(self, *, name: str, group: str, job_type: str, config: dict[str, Any],
                metrics: dict[str, Any], out_dir: Path) -> None:
        return None


class WandbLogger:
    """Weights & Biases, offline by default.

    Args:
        project: W&B project.
        entity: W&B entity (team or user), or None for the default.
        mode: ``offline`` (default; sync later with ``wandb sync``), ``online`` or ``disabled``.
        tags: run tags.
    """

    def __init__(self, project: str = "tda-bench", entity: str | None = None,
                 mode: str = "offline", tags: list[str] | None = None):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
        self.project = project
        self.entity = entity
        self.mode = mode
        self.tags = list(tags or [])

    def log_run(self, *, name: str, group: str, job_type: str, config: dict[str, Any],
                metrics: dict[str, Any], out_dir: Path) -> None:
        import wandb

        run = wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                         dir=str(out_dir), name=name, group=group, job_type=job_type,
                         tags=self.tags, config=flatten(config), reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True))
        try:
            run.summary.update({k: v for k, v in metrics.items() if v is not None})
        finally:
            run.finish()
