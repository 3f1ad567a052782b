"""Candidate filtering for gradient estimators (Grosse et al. 2023, §5.1: TF-IDF filter).

With ``candidates: {retriever: tfidf|bm25, k: 100}`` a gradient estimator computes training
gradients only for the union of each query's top-k lexical candidates and scores a query
only against its own candidates; every other pair gets no score (NaN), which the fact
metrics rank last. The lexical retrieval runs over the problem's text (query text = prompt
plus target).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.utils.data import Subset

from estimators.lexical import bm25_scores, require_text, tfidf_scores
from estimators.problem import AttributionProblem

RETRIEVERS = ("tfidf", "bm25")


def check_candidates(candidates: dict | None) -> dict | None:
    """Validates a ``{retriever, k}`` option (None: no filtering)."""
    if not candidates:
        return None
    candidates = dict(candidates)
    unknown = set(candidates) - {"retriever", "k"}
    if unknown:
        raise ValueError(f"candidates takes only 'retriever' and 'k', got {sorted(unknown)}")
    retriever, k = candidates.get("retriever", "tfidf"), int(candidates.get("k", 100))
    if retriever not in RETRIEVERS:
        raise ValueError(f"candidates.retriever must be one of {RETRIEVERS}, got {retriever!r}")
    if k <= 0:
        raise ValueError(f"candidates.k must be positive, got {k}")
    return {"retriever": retriever, "k": k}


def candidate_mask(problem: AttributionProblem, retriever: str, k: int) -> Tensor:
    """``[n_queries, n_train]`` bool: each query's top-``k`` lexical candidates."""
    documents, queries = require_text(problem, f"candidates.retriever={retriever}")
    lexical = (tfidf_scores(documents, queries) if retriever == "tfidf"
               else bm25_scores(documents, queries))
    top = lexical.topk(min(k, lexical.shape[1]), dim=1).indices
    return torch.zeros_like(lexical, dtype=torch.bool).scatter_(1, top, True)


def restricted(problem: AttributionProblem, indices: Tensor) -> AttributionProblem:
    """The same problem with the training set restricted to ``indices`` (a view)."""
    return dataclasses.replace(problem, train=Subset(problem.train, indices.tolist()))


def fill_unscored(scores: Tensor, mask: Tensor) -> Tensor:
    """Scores ``[..., Q, N]`` with NaN wherever ``mask`` ``[Q, N]`` is False."""
    return scores.masked_fill(~mask, float("nan"))
