"""Fact-tracing metrics (Chang et al. 2024): attribution by proponents, influence by
tail-patch, for tasks whose queries know the training documents that state their fact.

* ``mrr`` (per-query column ``rr``): 1 / rank of the best-ranked proponent; ``recall@{k}``:
  the fraction of the proponents in the top k; ``proponent_share``: Σ_{p ∈ proponents}
  score(q, p) / Σ_m |score(q, m)|. Truth: :mod:`bench.truths.proponents`. Ranks follow
  descending score, ties by training index; NaN scores (no score, e.g. outside a candidate
  filter) rank last.
* ``tail_patch``: the increase of the query's log p(target) after one training step on each
  of its top-k documents, averaged; ``tail_patch_random`` and ``tail_patch_gradnorm`` for k
  random documents and for the k of largest gradient norm (baselines). Truth:
  :mod:`bench.truths.tail_patch`.
* ``query_accuracy``: reported by the task (exact match of the queries' targets).

Each is averaged over the queries of each query group (``forward`` unprefixed,
``flipped_mrr`` for the flipped facts, ...).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bench.metrics.registry import Metric, evaluate, register_metric
from estimators.problem import AttributionProblem


def ranking(scores: Tensor) -> Tensor:
    """``[Q, N]`` training indices in descending score order (ties by index, NaN last)."""
    filled = torch.nan_to_num(scores.double(), nan=-torch.inf)
    return torch.sort(filled, dim=1, descending=True, stable=True).indices


def reciprocal_rank_recall(order: Tensor, proponents: list[list[int]],
                           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query reciprocal rank of the best proponent and recall@k ``([Q], [Q])``."""
    rr = np.full(len(proponents), np.nan)
    recall = np.full(len(proponents), np.nan)
    for q, props in enumerate(proponents):
        if not props:
            continue
        position = torch.empty_like(order[q])
        position[order[q]] = torch.arange(order.shape[1])
        ranks = position[torch.as_tensor(props)] + 1
        rr[q] = 1.0 / float(ranks.min())
        recall[q] = float((ranks <= k).double().mean())
    return rr, recall


def proponent_share(scores: Tensor, proponents: list[list[int]]) -> np.ndarray:
    """``[Q]``: Σ over proponents of the score / Σ over all documents of |score|."""
    s = torch.nan_to_num(scores.double(), nan=0.0)
    out = np.full(len(proponents), np.nan)
    for q, props in enumerate(proponents):
        total = float(s[q].abs().sum())
        if props and total > 0:
            out[q] = float(s[q, props].sum()) / total
    return out


def proponents_truth(problem: AttributionProblem, k: int = 10) -> dict:
    """The ``proponents`` truth of a problem: ``{proponents, k, params: {k}}``."""
    proponents = [list(map(int, p or [])) for p in problem.proponents]
    return {"proponents": proponents, "k": int(k), "params": {"k": int(k)}}


def fact_tracing(problem: AttributionProblem, scores: Tensor,
                 k: int = 10) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The attribution metrics (mrr, recall@k, proponent_share) of ``scores`` ``[Q, N]`` for
    a problem with proponents, per query group, outside a harness run."""
    return evaluate(scores, {"proponents": proponents_truth(problem, k)}, problem.query_groups)


def _recall(scores: Tensor, truth: dict) -> np.ndarray:
    return reciprocal_rank_recall(ranking(scores), truth["proponents"], truth["k"])[1]


register_metric(Metric(
    "mrr", needs="proponents", column="rr", order=40,
    values=lambda scores, t: reciprocal_rank_recall(ranking(scores), t["proponents"], t["k"])[0],
    doc="mean reciprocal rank of the best-ranked document that states the fact"))
register_metric(Metric(
    "recall@{k}", needs="proponents", order=41, values=_recall,
    doc="fraction of the documents that state the fact among the top k"))
register_metric(Metric(
    "proponent_share", needs="proponents", role="diagnostic", order=42,
    values=lambda scores, t: proponent_share(scores, t["proponents"]),
    doc="the proponents' share of the total absolute score"))
register_metric(Metric(
    "tail_patch", needs="tail_patch", order=43, values=lambda scores, t: t["tail_patch"],
    doc="increase of log p(target) after one training step on each top-k document"))
for _name, _order, _what, _row in (
        ("random", 44, "k random documents", "random ranking"),
        ("gradnorm", 45, "the k documents of largest gradient norm", "gradient-norm ranking")):
    register_metric(Metric(
        f"tail_patch_{_name}", needs="tail_patch", role="diagnostic", order=_order,
        values=lambda scores, t, key=f"tail_patch_{_name}": t[key],
        baseline=(_row, "tail_patch"), doc=f"tail-patch baseline: one step on {_what}"))
register_metric(Metric("query_accuracy", role="info", order=80,
                       doc="exact match of the queries' targets (reported by the task)"))
