"""The benchmark's metrics as plain functions of scores and a ground truth.

Each function computes the registered metric spec of the same name (:mod:`bench.metrics`)
and averages it over the queries as a run does (queries whose value is undefined left out),
so a notebook's number is the number ``tda-bench`` records:

* :func:`lds` (Park et al. 2023) against ``tda_bench.ground_truth.lds``;
* :func:`loo` (Pearson or Spearman) against ``tda_bench.ground_truth.loo``;
* :func:`mrr`, :func:`recall` (Chang et al. 2024) against the queries' proponents;
* :func:`mislabel` (self-influence against flipped labels);
* :func:`evaluate`: every metric of several ground truths at once, as a run's record.

``scores`` is ``[n_queries, n_train]`` (a tensor or an array), positive = proponent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench import metrics as registry
from bench.metrics.mislabel import mislabel_metrics
from estimators.problem import AttributionProblem

# What each kind's assembled truth holds (the outputs of tda_bench.ground_truth).
TRUTH_KEYS = {"lds": ("masks", "outputs"), "loo": ("indices", "effects")}


def _scores(scores: Any) -> Tensor:
    out = torch.as_tensor(scores)
    if out.dim() != 2:
        raise ValueError(f"scores must be a [n_queries, n_train] matrix, got shape "
                         f"{tuple(out.shape)}.")
    return out


def _truth(kind: str, ground_truth: Any) -> dict:
    keys = TRUTH_KEYS[kind]
    if not isinstance(ground_truth, dict) or not set(keys) <= set(ground_truth):
        got = sorted(ground_truth) if isinstance(ground_truth, dict) else type(ground_truth)
        raise ValueError(f"ground_truth must be the result of tda_bench.ground_truth.{kind} "
                         f"(keys {', '.join(keys)}), got {got}.")
    return ground_truth


def per_query(name: str, scores: Any, truth: dict) -> np.ndarray:
    """``[n_queries]``: the registered metric ``name``'s value for each query."""
    spec = registry.spec_for(name)
    if spec is None or spec.values is None:
        known = sorted(m.name for m in registry.metrics() if m.values is not None)
        raise ValueError(f"unknown metric {name!r}; the metrics are: {', '.join(known)}.")
    return np.asarray(spec.values(_scores(scores), truth), dtype=float)


def _mean(name: str, scores: Any, truth: dict) -> float:
    return registry.mean_sem(per_query(name, scores, truth))[0]


def _check_shape(scores: Tensor, n_queries: int, n_train: int, source: str) -> None:
    if tuple(scores.shape) != (n_queries, n_train):
        raise ValueError(f"scores must be [n_queries, n_train] = [{n_queries}, {n_train}] for "
                         f"this {source}, got {list(scores.shape)}.")


def lds(scores: Any, ground_truth: dict) -> float:
    """The linear datamodeling score: per query, the Spearman correlation over the subsets
    S_j between Σ_{m∈S_j} score(q, m) and the retrained models' mean measurement; the mean
    over queries.

    Args:
        scores: ``[n_queries, n_train]``.
        ground_truth: ``tda_bench.ground_truth.lds(...)`` (``masks [M, N]``,
            ``outputs [M, Q]``).
    """
    truth = _truth("lds", ground_truth)
    s = _scores(scores)
    _check_shape(s, truth["outputs"].shape[1], truth["masks"].shape[1], "LDS ground truth")
    return _mean("lds", s, truth)


def loo(scores: Any, ground_truth: dict, method: str = "pearson") -> float:
    """The correlation over the removed points between score(q, m) and the actual effect
    f(θ) − f(θ₋ₘ), per query (``method``: ``pearson`` or ``spearman``); the mean.

    Args:
        scores: ``[n_queries, n_train]``.
        ground_truth: ``tda_bench.ground_truth.loo(...)`` (``indices [L]``,
            ``effects [L, Q]``).
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}.")
    truth = _truth("loo", ground_truth)
    s = _scores(scores)
    if s.shape[0] != truth["effects"].shape[1]:
        raise ValueError(f"scores must have one row per query of the LOO ground truth "
                         f"({truth['effects'].shape[1]}), got {s.shape[0]}.")
    return _mean(f"loo_{method}", s, truth)


def _proponents(proponents: AttributionProblem | Sequence[Sequence[int]], k: int) -> dict:
    if isinstance(proponents, AttributionProblem):
        if proponents.proponents is None:
            raise ValueError("proponents: this problem has none; pass per query the training "
                             "indices that state its fact.")
        proponents = proponents.proponents
    return {"proponents": [list(map(int, p or [])) for p in proponents], "k": int(k)}


def mrr(scores: Any, proponents: AttributionProblem | Sequence[Sequence[int]]) -> float:
    """Mean reciprocal rank of each query's best-ranked proponent.

    Args:
        scores: ``[n_queries, n_train]``.
        proponents: per query the training indices that state its fact, or a problem
            that has them (``causal_lm_problem(..., proponents=...)``).
    """
    truth = _proponents(proponents, 1)
    s = _scores(scores)
    if s.shape[0] != len(truth["proponents"]):
        raise ValueError(f"proponents must hold one list per query ({s.shape[0]}), got "
                         f"{len(truth['proponents'])}.")
    return _mean("mrr", s, truth)


def recall(scores: Any, proponents: AttributionProblem | Sequence[Sequence[int]],
           k: int = 10) -> float:
    """The mean fraction of each query's proponents among its top ``k`` training examples
    (``recall@k``; arguments as for :func:`mrr`)."""
    truth = _proponents(proponents, k)
    s = _scores(scores)
    if s.shape[0] != len(truth["proponents"]):
        raise ValueError(f"proponents must hold one list per query ({s.shape[0]}), got "
                         f"{len(truth['proponents'])}.")
    return _mean("recall@{k}", s, truth)


def mislabel(self_influence: Any, flipped: Any) -> dict[str, float]:
    """``mislabel_auc`` and ``mislabel_recall@{10,20}pct`` of a self-influence ranking
    (an estimator's ``self_influence(problem)``, ``[n_train]``) against the flipped labels
    (bool ``[n_train]``)."""
    return mislabel_metrics(torch.as_tensor(self_influence), torch.as_tensor(flipped))


def evaluate(scores: Any, ground_truths: dict[str, dict],
             groups: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Every registered metric of ``scores`` against ``ground_truths`` (by kind:
    ``{"lds": ..., "loo": ...}``), averaged per query group as in a run's ``metrics.json``
    (``groups``: ``{group: query indices}``, e.g. ``problem.query_groups``)."""
    return registry.evaluate(_scores(scores), dict(ground_truths), groups)[0]


__all__ = ["evaluate", "lds", "loo", "mislabel", "mrr", "per_query", "recall"]
