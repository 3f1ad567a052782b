"""How concentrated influence is (Grosse et al. 2023, §5.2: influence is heavy-tailed).

``top1pct_share``: per query, the share of Σ_m |score(q, m)| carried by the 1 % of training
examples with the largest |score| (at least one example); 1 % would mean no concentration
at all, 1 that a single example's worth carries everything. It reads the scores only
(truth: :mod:`bench.truths.score_distribution`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.metrics.registry import Metric, register_metric

TOP_FRACTION = 0.01


def top_share(scores: torch.Tensor, fraction: float = TOP_FRACTION) -> np.ndarray:
    """``[Q]``: the share of each query's total |score| held by its top ``fraction`` of
    training examples (NaN where every score is 0 or undefined)."""
    magnitude = torch.nan_to_num(scores.double(), nan=0.0).abs()
    k = max(1, math.ceil(fraction * magnitude.shape[1]))
    total = magnitude.sum(1)
    share = magnitude.topk(k, dim=1).values.sum(1) / total.clamp_min(1e-300)
    return torch.where(total > 0, share, torch.nan).numpy()


register_metric(Metric("top1pct_share", needs="score_distribution", role="diagnostic",
                       order=70, values=lambda scores, truth: top_share(scores),
                       doc="share of a query's total |score| held by its top 1 % of examples"))
