"""Correlation metrics against retraining ground truth (scipy).

* ``lds`` (Park et al. 2023; truth :mod:`bench.truths.lds`): for query q, the Spearman
  correlation over subsets j between the additive prediction Σ_{m∈S_j} score(q, m) and the
  seed-averaged measurement f(z_q; θ_{S_j}); the mean over queries with its standard error
  (``lds_sem``). ``lds_ceiling``: the noise ceiling of that truth over the same queries
  (:func:`lds_ceiling_per_query`).
* ``loo_pearson``, ``loo_spearman`` (truth :mod:`bench.truths.loo`): for query q, the
  correlations over the removed points m between score(q, m) and f(θ) − f(θ₋ₘ).
* ``pbrf_pearson``, ``pbrf_spearman`` (Grosse et al. 2023 §2.2; truth
  :mod:`bench.truths.pbrf`): as LOO, against the proximal Bregman response (f(θ*) − f(θˢ))/ε.

All are positive when the estimator follows the sign convention of DESIGN.md. A query whose
correlation is undefined (constant values) counts as NaN and is left out of the mean.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from bench.metrics.registry import Metric, mean_sem, register_metric


def _columnwise(x: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """Correlation of each column pair of ``x`` and ``y`` ``[n, Q]`` -> ``[Q]``."""
    out = np.full(x.shape[1], np.nan)
    for q in range(x.shape[1]):
        a, b = x[:, q], y[:, q]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
        out[q] = fn(a, b)[0]
    return out


def lds_per_query(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor) -> np.ndarray:
    """Per-query LDS.

    Args:
        scores: ``[Q, N]``.
        masks: ``[M, N]`` bool, the training subsets.
        outputs: ``[M, Q]``, the seed-averaged measurement of each subset's models.

    Returns:
        ``[Q]`` Spearman correlations.
    """
    predicted = masks.double() @ scores.double().T  # [M, Q]
    return _columnwise(predicted.numpy(), outputs.double().numpy(), "spearman")


def loo_per_query(scores: torch.Tensor, indices: torch.Tensor,
                  effects: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-query LOO correlations.

    Args:
        scores: ``[Q, N]``.
        indices: ``[L]`` the removed training points.
        effects: ``[L, Q]`` the actual effects f(θ) − f(θ₋ₘ).

    Returns:
        ``([Q] Pearson, [Q] Spearman)``.
    """
    predicted = scores.double()[:, indices].T.numpy()  # [L, Q]
    actual = effects.double().numpy()
    return _columnwise(predicted, actual, "pearson"), _columnwise(predicted, actual, "spearman")


def lds_ceiling_per_query(values: torch.Tensor) -> np.ndarray | None:
    """The LDS noise ceiling of each query: split-half agreement of the ground truth between
    its seeds.

    The K retraining seeds are split into halves (first ⌊K/2⌋, rest); for each query, the
    Spearman correlation over subsets between the two halves' mean measurements. Its mean
    over queries (:func:`lds_ceiling`) measures how reproducible the ground truth is, r; the
    LDS uses the mean of all K seeds, which is less noisy, so an estimator that predicted
    the expected measurement exactly would reach about √(2r/(1 + r)) (Spearman-Brown), above
    r itself. Per query, so that query groups (forward and flipped facts) get their own.

    Args:
        values: ``[M, K, Q]`` per-subset, per-seed measurements.

    Returns:
        ``[Q]`` split-half Spearman correlations, or None when K < 2.
    """
    if values.dim() != 3 or values.shape[1] < 2:
        return None
    half = values.shape[1] // 2
    first, second = values[:, :half].double().mean(1), values[:, half:].double().mean(1)
    return _columnwise(first.numpy(), second.numpy(), "spearman")


def lds_ceiling(values: torch.Tensor) -> float | None:
    """The mean over queries of :func:`lds_ceiling_per_query` (None when K < 2)."""
    per_query = lds_ceiling_per_query(values)
    return None if per_query is None else mean_sem(per_query)[0]


def _effects(kind: str):
    def values(scores: torch.Tensor, truth: dict) -> np.ndarray:
        pearson, spearman = loo_per_query(scores, truth["indices"], truth["effects"])
        return pearson if kind == "pearson" else spearman
    return values


register_metric(Metric(
    "lds", needs="lds", sem=True, order=10,
    values=lambda scores, t: lds_per_query(scores, t["masks"], t["outputs"]),
    doc="linear datamodeling score: per-query Spearman over retrained subsets, averaged"))
register_metric(Metric(
    "lds_ceiling", needs="lds", role="info", order=12, printed=False,
    values=lambda scores, t: lds_ceiling_per_query(t["values"]) if "values" in t else None,
    doc="split-half agreement of the LDS ground truth between its retraining seeds (over "
        "the same queries as lds)"))
for _truth, _order in (("loo", 20), ("pbrf", 30)):
    for _i, _kind in enumerate(("pearson", "spearman")):
        register_metric(Metric(
            f"{_truth}_{_kind}", needs=_truth, order=_order + _i, values=_effects(_kind),
            doc=f"per-query {_kind.capitalize()} correlation with the {_truth.upper()} effects"))
