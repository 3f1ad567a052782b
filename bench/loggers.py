"""Experiment loggers, chosen by the ``logger`` config group (``wandb`` or ``none``).

A logger receives one finished run: its name ``{task}/{estimator}/seed{seed}``, group (the
experiment, else the task), job type (the estimator), the resolved config flattened to
dotted keys (so dashboards can filter by any field) and the metrics for the run summary,
and optionally the score matrix ``[n_queries, n_train]`` and the texts of the examples.

W&B summary keys are the record's metric keys (``lds``, ``lds_sem``, ``lds_ceiling``,
``loo_pearson``, ``loo_spearman``, ``fit_seconds``, ``score_seconds``, ``peak_rss_mb``, ...)
plus ``seconds`` (fit + score); the table ``metrics`` lists them with the role and direction
their metric specs give (:mod:`bench.metrics`); the table ``top_proponents`` holds the top-k
training examples per query (with their text for text tasks); the run's plots are logged under
``plots/<name>``; the score matrix is an artifact of type ``scores`` when opted in.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.metrics import higher_is_better, spec_for
from estimators.atomic import payload_bytes, write_bytes
from estimators.options import bounded, choice, flag, names_arguments, natural

log = logging.getLogger(__name__)


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
                metrics: dict[str, Any], out_dir: Path, **extra: Any) -> None:
        return None


class WandbLogger:
    """Weights & Biases, offline by default.

    Args:
        project: W&B project.
        entity: W&B entity (team or user), or None for the default.
        mode: ``offline`` (default; sync later with ``wandb sync``), ``online`` or ``disabled``.
        tags: run tags.
        top_k: proponents per query in the ``top_proponents`` table (0: no table).
        plots: render the run's plots (score CCDF, layer share) and log them as images.
        log_scores: upload the score matrix as an artifact (opt-in).
        max_score_mb: the largest score matrix (float32 MiB) uploaded when ``log_scores``.
    """

    def __init__(self, project: str = "tda-bench", entity: str | None = None,
                 mode: str = "offline", tags: list[str] | None = None, top_k: int = 10,
                 plots: bool = True, log_scores: bool = False, max_score_mb: float = 64.0):
        self.mode = choice("mode", mode, ("offline", "online", "disabled"))
        self.top_k = natural("top_k", top_k)
        self.max_score_mb = bounded("max_score_mb", max_score_mb, 0)
        self.plots = flag("plots", plots)
        self.log_scores = flag("log_scores", log_scores)
        self.project = project
        self.entity = entity
        self.tags = list(tags or [])

    def log_run(self, *, name: str, group: str, job_type: str, config: dict[str, Any],
                metrics: dict[str, Any], out_dir: Path, scores: Tensor | None = None,
                train_text: list[str] | None = None,
                query_text: list[str] | None = None) -> None:
        """Logs one run (see the module docstring for what goes where).

        Args:
            scores: ``[n_queries, n_train]``, or None (no table, plots or artifact).
            train_text: ``n_train`` texts of the training examples (text tasks), or None.
            query_text: ``n_queries`` texts of the queries, or None.
        """
        import wandb

        out_dir = Path(out_dir)
        run = wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                         dir=str(out_dir), name=name, group=group, job_type=job_type,
                         tags=self.tags, config=flatten(config), reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True))
        try:
            summary = summary_metrics(metrics)
            run.summary.update(summary)
            payload: dict[str, Any] = {"metrics": wandb.Table(
                columns=["metric", "value", "role", "higher_is_better"],
                data=metric_rows(summary))}
            if scores is not None and self.top_k:
                columns, rows = top_proponents(scores, self.top_k, train_text, query_text)
                payload["top_proponents"] = wandb.Table(columns=columns, data=rows)
            if scores is not None and self.plots:
                from bench.report.plots import run_plots

                run_plots(out_dir, scores, name)
            payload.update({f"plots/{p.stem}": wandb.Image(str(p))
                            for p in sorted(out_dir.glob("*.png"))})
            if payload:
                run.log(payload)
            if scores is not None and self.log_scores:
                self._log_scores(run, name, scores, out_dir)
        finally:
            run.finish()

    def _log_scores(self, run: Any, name: str, scores: Tensor, out_dir: Path) -> None:
        """The score matrix as a ``scores`` artifact, unless larger than ``max_score_mb``."""
        import wandb

        size_mb = scores.numel() * 4 / 2**20
        if size_mb > self.max_score_mb:
            log.warning("Not uploading the %.1f MiB score matrix of %s (logger.max_score_mb=%s)",
                        size_mb, name, self.max_score_mb)
            run.summary["scores_artifact"] = f"skipped: {size_mb:.1f} MiB"
            return
        path = out_dir / "scores.pt"
        if not path.exists():
            write_bytes(path, payload_bytes(scores.float()))
        artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"scores-{name}"),
                                  type="scores", metadata={"shape": list(scores.shape)})
        artifact.add_file(str(path))
        run.log_artifact(artifact)


names_arguments(WandbLogger, "logger")  # a bad value names logger.<key>


def metric_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """``[metric, value, role, higher_is_better]`` per numeric summary key, as the metric
    specs (:mod:`bench.metrics`) describe it (role ``""`` for a key without a spec)."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        spec = spec_for(key)
        rows.append([key, float(value), spec.role if spec else "", higher_is_better(key)])
    return rows


def summary_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run summary: the metrics under their record keys, plus ``seconds`` = fit + score."""
    out = {k: v for k, v in metrics.items() if v is not None}
    if "fit_seconds" in out and "score_seconds" in out:
        out["seconds"] = out["fit_seconds"] + out["score_seconds"]
    return out


def top_proponents(scores: Tensor, k: int, train_text: list[str] | None,
                   query_text: list[str] | None) -> tuple[list[str], list[list[Any]]]:
    """Rows of the top-``k`` proponents (highest scores) of each query.

    Args:
        scores: ``[n_queries, n_train]``.

    Returns:
        ``(columns, rows)``: query, rank (1 = strongest), train_index, score, and the query
        and training texts where given.
    """
    values, indices = torch.topk(scores.float(), min(k, scores.shape[1]), dim=1)
    columns = ["query", "rank", "train_index", "score"]
    columns += ["query_text"] if query_text is not None else []
    columns += ["train_text"] if train_text is not None else []
    rows = []
    for q in range(scores.shape[0]):
        for rank, (value, m) in enumerate(zip(values[q].tolist(), indices[q].tolist(),
                                              strict=True), start=1):
            row: list[Any] = [q, rank, m, value]
            row += [str(query_text[q])] if query_text is not None else []
            row += [str(train_text[m])] if train_text is not None else []
            rows.append(row)
    return columns, rows
