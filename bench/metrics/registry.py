"""The metric plug-in seam: one :class:`Metric` spec per record key, read everywhere.

A metric declares once (as lm-evaluation-harness's registry does) its record key, which
ground truth it reads, how it is computed per query, whether higher is better, and its role:

* ``headline``: an accuracy metric tables lead with (bold best value, paired differences,
  accuracy-vs-cost plots);
* ``diagnostic``: a further measurement, a leaderboard column when it has per-query values;
* ``cost``: seconds or memory, lower is better, the x axis of the plots;
* ``info``: recorded (and printed) but not a leaderboard column.

:func:`evaluate` computes every registered metric whose ground truth the run has; the
printed table (:mod:`bench.cli`), the leaderboard (:mod:`bench.report`) and the W&B logger
read the same specs. A spec's ``name`` may hold ``{fields}`` filled from the truth's
``params`` (``recall@{k}`` → ``recall@10``). Queries in groups (``problem.query_groups``,
e.g. forward and flipped facts) get each per-query metric per group: the plain key over the
``forward`` group, ``{group}_{key}`` over the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

ROLES = ("headline", "diagnostic", "cost", "info")
PRIMARY_GROUP = "forward"  # the query group whose metrics carry no prefix

# (scores [n_queries, n_train], truth) -> per-query values [n_queries], a scalar, or None
Values = Callable[[Tensor, dict], Any]


@dataclass(frozen=True)
class Metric:
    """One metric (see the module docstring).

    Attributes:
        name: the record key, or a template with ``{fields}`` from the truth's ``params``.
        needs: the ground-truth kind whose assembled value ``values`` reads (``lds``,
            ``proponents``, ...); None for numbers the harness records itself (costs).
        values: ``(scores, truth) -> [n_queries] | scalar | None`` (None: not defined in
            this run). Per-query values are averaged over the finite queries.
        role: ``headline``, ``diagnostic``, ``cost`` or ``info``.
        higher_is_better: default: every role but ``cost``.
        sem: also record ``{key}_sem``, the standard error over queries.
        column: the ``per_query.csv`` column (default: the key).
        order: position in tables and printouts (then by name).
        printed: shown in a run's printed summary.
        baseline: ``(row, metric)`` when this key is the value of ``metric`` for a baseline
            ranking that does not depend on the estimator (``tail_patch_random`` is
            ``tail_patch`` of k random documents): the leaderboard shows it as a row of its
            own, named ``row``, not as a column repeated in every estimator's row.
        doc: one line for the docs.
    """

    name: str
    needs: str | None = None
    values: Values | None = None
    role: str = "headline"
    higher_is_better: bool | None = None
    sem: bool = False
    column: str | None = None
    order: int = 100
    printed: bool = True
    baseline: tuple[str, str] | None = None
    doc: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"metric {self.name!r}: role must be one of {ROLES}, got "
                             f"{self.role!r}")
        if self.higher_is_better is None:
            object.__setattr__(self, "higher_is_better", self.role != "cost")

    @property
    def templated(self) -> bool:
        return "{" in self.name

    def key(self, truth: dict | None = None) -> str:
        """The record key in a run whose truth is ``truth`` (fills the template)."""
        return self.name.format(**(truth or {}).get("params", {})) if self.templated else self.name

    def matches(self, key: str) -> bool:
        """Whether ``key`` is this metric's record key in some run."""
        if not self.templated:
            return key == self.name
        pattern = re.sub(r"\\\{[^}]*\\\}", "(.+)", re.escape(self.name))
        return re.fullmatch(pattern, key) is not None

    def column_for(self, key: str) -> str:
        """The per-query column of record key ``key``."""
        if self.column is None:
            return key
        if not self.templated:
            return self.column
        return self.column + key[len(self.name.split("{")[0]):]


_METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Registers ``metric`` under its name. Registering a name again replaces the spec (a
    module imported twice) unless the two disagree on what they read or their role."""
    existing = _METRICS.get(metric.name)
    if existing is not None and (existing.needs, existing.role) != (metric.needs, metric.role):
        raise ValueError(f"metric {metric.name!r} is already registered (needs "
                         f"{existing.needs!r}, role {existing.role!r}); choose another name")
    _METRICS[metric.name] = metric
    return metric


def metrics() -> list[Metric]:
    """Every registered metric, in table order."""
    return sorted(_METRICS.values(), key=lambda m: (m.order, m.name))


def spec_for(key: str) -> Metric | None:
    """The spec whose record key ``key`` is (exact names before templates), or None."""
    if key in _METRICS:
        return _METRICS[key]
    return next((m for m in metrics() if m.templated and m.matches(key)), None)


def role_of(key: str) -> str | None:
    spec = spec_for(key)
    return spec.role if spec else None


def is_headline(key: str) -> bool:
    return role_of(key) == "headline"


def is_cost(key: str) -> bool:
    return role_of(key) == "cost"


def higher_is_better(key: str) -> bool:
    """Whether a larger value of ``key`` is better (unknown keys: yes)."""
    spec = spec_for(key)
    return True if spec is None else bool(spec.higher_is_better)


def order_of(key: str) -> tuple[int, str]:
    spec = spec_for(key)
    return (spec.order if spec else 100, key)


def is_printed(key: str) -> bool:
    """Whether a run's printed summary shows ``key`` (``{group}_`` variants and ``_sem``
    companions follow their metric)."""
    spec = spec_for(key)
    if spec is None and key.endswith("_sem"):
        base = spec_for(key[:-4]) or _grouped(key[:-4])
        return base is not None and base.sem and base.printed
    spec = spec or _grouped(key)
    return spec is not None and spec.printed


def baseline_rows() -> list[str]:
    """The names of the baseline rows the registered metrics define, sorted."""
    return sorted({m.baseline[0] for m in metrics() if m.baseline})


def baseline_of(key: str) -> tuple[str, str] | None:
    """``(row, metric)`` when ``key`` is a baseline ranking's value of ``metric`` (also for a
    query group's variant: ``flipped_tail_patch_random`` -> ``flipped_tail_patch``)."""
    spec = spec_for(key)
    if spec is not None:
        return spec.baseline
    grouped = _grouped(key)
    if grouped is None or grouped.baseline is None:
        return None
    prefix = key.split("_", 1)[0]
    return grouped.baseline[0], f"{prefix}_{grouped.baseline[1]}"


def _grouped(key: str) -> Metric | None:
    """The spec of ``{group}_{key}``, a metric over one query group."""
    return spec_for(key.split("_", 1)[1]) if "_" in key else None


def mean_sem(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite entries."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    sem = finite.std(ddof=1) / np.sqrt(finite.size) if finite.size > 1 else float("nan")
    return float(finite.mean()), float(sem)


def evaluate(scores: Tensor, truths: dict[str, Any],
             groups: dict[str, list[int]] | None = None) -> tuple[dict, dict]:
    """Every registered metric of ``scores`` ``[Q, N]`` against the available ``truths``.

    Args:
        truths: assembled ground truths by kind (a kind whose value is None is absent).
        groups: ``{group: query indices}`` (see the module docstring), or None.

    Returns:
        ``(metrics, per_query)``: scalar metrics under their record keys (in table order),
        and per-query arrays ``[Q]`` under their columns (first ``query_set`` when there are
        groups).
    """
    metrics_out: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    entries = []  # (metric, key, scalar or per-query column), in table order
    for metric in metrics():
        truth = truths.get(metric.needs) if metric.needs else None
        if truth is None or metric.values is None:
            continue
        key = metric.key(truth)
        value = metric.values(scores, truth)
        if value is None:
            continue
        if np.ndim(value):
            value = np.asarray(value, dtype=float)
            per_query[metric.column_for(key)] = value
        entries.append((metric, key, value))
    if groups:
        names = np.full(scores.shape[0], "", dtype=object)
        for name, indices in groups.items():
            names[list(map(int, indices))] = name
        per_query = {"query_set": names.astype(str), **per_query}
    first = True
    for name, indices in (groups or {PRIMARY_GROUP: None}).items():
        if indices is not None and not len(indices):
            continue
        prefix = "" if name == PRIMARY_GROUP else f"{name}_"
        for metric, key, value in entries:
            if not np.ndim(value):  # a scalar: once, not per group
                if first:
                    metrics_out[key] = float(value)
                continue
            chosen = value if indices is None else value[list(map(int, indices))]
            mean, sem = mean_sem(chosen)
            metrics_out[prefix + key] = mean
            if metric.sem:
                metrics_out[f"{prefix}{key}_sem"] = sem
        first = False
    return metrics_out, per_query
