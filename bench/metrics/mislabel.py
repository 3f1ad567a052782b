"""Mislabel detection by self-influence (Koh & Liang 2017 §5.4; Pruthi et al. 2020 §4).

Training examples ranked by self-influence ∇L(z_m)ᵀ H⁻¹ ∇L(z_m) (the estimator's
``self_influence``), against the labels the task flipped (truth: :mod:`bench.truths.mislabel`):
``mislabel_auc`` (ROC AUC with flipped examples positive, ties count half) and
``mislabel_recall@10pct`` / ``@20pct`` (the fraction of flipped examples among the top 10 % /
20 % of the ranking); ``self_influence_seconds`` is the time it took.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from bench.metrics.registry import Metric, register_metric

PERCENTS = (10, 20)


def mislabel_metrics(self_influence: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    """``mislabel_auc`` and ``mislabel_recall@{pct}pct`` (see module docstring).

    Args:
        self_influence: ``[n_train]``, higher = more suspicious.
        flipped: ``[n_train]`` bool, the training examples whose label was flipped.
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
    for pct in PERCENTS:
        top = order[: int(round(n * pct / 100))]
        out[f"mislabel_recall@{pct}pct"] = float(positive[top].sum() / n_pos)
    return out


def _value(key: str):
    return lambda scores, truth: mislabel_metrics(truth["self_influence"], truth["flipped"])[key]


register_metric(Metric("mislabel_auc", needs="mislabel", order=50, values=_value("mislabel_auc"),
                       doc="ROC AUC of the self-influence ranking for the flipped labels"))
for _i, _pct in enumerate(PERCENTS):
    register_metric(Metric(
        f"mislabel_recall@{_pct}pct", needs="mislabel", role="diagnostic", order=51 + _i,
        values=_value(f"mislabel_recall@{_pct}pct"),
        doc=f"flipped labels among the top {_pct} % of the self-influence ranking"))
register_metric(Metric("self_influence_seconds", needs="mislabel", role="info", order=59,
                       printed=False, values=lambda scores, truth: truth["seconds"],
                       doc="seconds to compute every training example's self-influence"))
