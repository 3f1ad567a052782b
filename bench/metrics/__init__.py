"""Metrics: one :class:`~bench.metrics.registry.Metric` spec per record key, registered by
the modules of this package (correlation, fact tracing, mislabel detection, removal, costs)
and by plug-ins; :func:`evaluate` computes them from a run's ground truths."""

from __future__ import annotations

import importlib
import pkgutil

from bench.metrics.correlation import lds_ceiling, lds_per_query, loo_per_query
from bench.metrics.mislabel import mislabel_metrics
from bench.metrics.registry import (
    Metric,
    baseline_of,
    baseline_rows,
    evaluate,
    higher_is_better,
    is_cost,
    is_headline,
    is_printed,
    mean_sem,
    metrics,
    register_metric,
    spec_for,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Metric", "baseline_of", "baseline_rows", "evaluate", "higher_is_better", "is_cost",
           "is_headline", "is_printed", "lds_ceiling", "lds_per_query", "loo_per_query",
           "mean_sem", "metrics", "mislabel_metrics", "register_metric", "spec_for"]
