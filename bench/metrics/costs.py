"""Costs the harness records for every run: seconds and memory (lower is better)."""

from __future__ import annotations

from bench.metrics.registry import Metric, register_metric

register_metric(Metric("fit_seconds", role="info", order=90,
                       doc="wall time of the estimator's fit (factors, curvature, index)"))
register_metric(Metric("score_seconds", role="info", order=91,
                       doc="wall time of the estimator's score"))
register_metric(Metric("seconds", role="cost", order=92, printed=False,
                       doc="fit + score seconds (the leaderboard's cost column)"))
register_metric(Metric("peak_rss_mb", role="cost", order=93,
                       doc="peak resident memory (MiB) during fit and score"))
register_metric(Metric("baseline_rss_mb", role="info", order=94, printed=False,
                       doc="resident memory (MiB) before the fit: Python, torch, the data and "
                           "the model; memory_budget_mb bounds what the run uses beyond it"))
for stage, what in (("model", "training the attributed model, or loading it from the cache"),
                    ("ground_truth", "computing the ground truth (retraining), or loading it"),
                    ("evaluate", "the ground truths that need the scores (tail-patch), then "
                                 "the metrics")):
    register_metric(Metric(f"{stage}_seconds", role="info", order=95, printed=False,
                           doc=f"wall time of {what}"))
register_metric(Metric("job_seconds", role="info", order=96, printed=False,
                       doc="wall time of the whole job, resolve to evaluate (imports and the "
                           "record not counted)"))
register_metric(Metric("memory_budget_mb", role="info", order=97, printed=False,
                       doc="the budget (MiB) the run's stages were planned within, beyond the "
                           "baseline (a setting, not a measured cost)"))
register_metric(Metric("{memory}_mb", role="cost", order=99, printed=False,
                       doc="any other memory figure (MiB) a run records"))
