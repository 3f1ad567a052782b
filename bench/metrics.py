"""Metrics that compare a score matrix with ground truth (scipy-based correlations).

* LDS (Park et al. 2023): for query q, the Spearman correlation over subsets j between the
  additive prediction Σ_{m∈S_j} score(q, m) and the seed-averaged measurement f(z_q; θ_{S_j});
  reported as the mean over queries (``lds``) with its standard error (``lds_sem``).
* LOO: for query q, the Pearson and Spearman correlations over the removed points m between
  score(q, m) and the actual effect f(θ) − f(θ₋ₘ) (``loo_pearson``, ``loo_spearman``).

* PBRF (Grosse et al. 2023 §2.2; :mod:`bench.pbrf`): as LOO, against the proximal Bregman
  response (f(θ*) − f(θˢ))/ε of the chosen examples (``pbrf_pearson``, ``pbrf_spearman``).

All are positive when the estimator follows the sign convention of DESIGN.md. A query whose
correlation is undefined (constant values) counts as NaN and is left out of the mean.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats


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


def mean_sem(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite entries."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    sem = finite.std(ddof=1) / np.sqrt(finite.size) if finite.size > 1 else float("nan")
    return float(finite.mean()), float(sem)


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


def evaluate(scores: torch.Tensor, truths: dict[str, dict]) -> tuple[dict, dict]:
    """All metrics of ``scores`` against the available ground truths.

    Returns:
        ``(metrics, per_query)``: scalar metrics under their record keys, and per-query
        arrays ``[Q]`` under the same keys.
    """
    metrics: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    if "lds" in truths:
        per_query["lds"] = lds_per_query(scores, truths["lds"]["masks"], truths["lds"]["outputs"])
        metrics["lds"], metrics["lds_sem"] = mean_sem(per_query["lds"])
    if "loo" in truths:
        t = truths["loo"]
        per_query["loo_pearson"], per_query["loo_spearman"] = loo_per_query(
            scores, t["indices"], t["effects"])
        metrics["loo_pearson"] = mean_sem(per_query["loo_pearson"])[0]
        metrics["loo_spearman"] = mean_sem(per_query["loo_spearman"])[0]
    if "pbrf" in truths:  # same layout as LOO: effects [L, Q] of the chosen examples
        t = truths["pbrf"]
        per_query["pbrf_pearson"], per_query["pbrf_spearman"] = loo_per_query(
            scores, t["indices"], t["effects"])
        metrics["pbrf_pearson"] = mean_sem(per_query["pbrf_pearson"])[0]
        metrics["pbrf_spearman"] = mean_sem(per_query["pbrf_spearman"])[0]
    return metrics, per_query


def lds_ceiling(values: torch.Tensor) -> float | None:
    """The LDS noise ceiling: split-half agreement of the ground truth between its seeds.

    The K retraining seeds are split into halves (first ⌊K/2⌋, rest); for each query, the
    Spearman correlation over subsets between the two halves' mean measurements; the mean
    over queries. It measures how reproducible the ground truth is, r; the LDS uses the
    mean of all K seeds, which is less noisy, so an estimator that predicted the expected
    measurement exactly would reach about √(2r/(1 + r)) (Spearman-Brown), above r itself.

    Args:
        values: ``[M, K, Q]`` per-subset, per-seed measurements.

    Returns:
        the mean split-half Spearman correlation, or None when K < 2.
    """
    if values.dim() != 3 or values.shape[1] < 2:
        return None
    half = values.shape[1] // 2
    first, second = values[:, :half].double().mean(1), values[:, half:].double().mean(1)
    return mean_sem(_columnwise(first.numpy(), second.numpy(), "spearman"))[0]


def mislabel_metrics(self_influence: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    """Mislabel detection by self-influence (Koh & Liang 2017 §5.4; Pruthi et al. 2020 §4).

    Args:
        self_influence: ``[n_train]``, higher = more suspicious.
        flipped: ``[n_train]`` bool, the training examples whose label was flipped.

    Returns:
        ``mislabel_auc``: ROC AUC of the ranking with flipped examples positive (ties count
        half); ``mislabel_recall@10pct`` / ``@20pct``: the fraction of flipped examples among
        the top 10 % / 20 % of the ranking.
    """
    values = self_influence.double().cpu().numpy()
    positive = flipped.bool().cpu().numpy()
    n_pos, n = int(positive.sum()), len(values)
    if n_pos in (0, n):
        raise ValueError("mislabel metrics need both flipped and clean training examples.")
    ranks = stats.rankdata(values)  # average ranks for ties
    auc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    order = np.argsort(-values, kind="stable")
    out = {"mislabel_auc": float(auc)}
    for pct in (10, 20):
        top = order[: int(round(n * pct / 100))]
        out[f"mislabel_recall@{pct}pct"] = float(positive[top].sum() / n_pos)
    return out
