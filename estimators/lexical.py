"""Lexical retrieval scores over a problem's text: BM25 (``bm25s``) and TF-IDF (sklearn).

Shared by the ``bm25`` estimator and the candidate filter of gradient estimators; it imports
no estimator, so ``estimators.base`` can use it. Query text is the problem's ``query_text``
(for fact tracing: prompt plus target, as in Chang et al. 2024).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from estimators.problem import AttributionProblem

STOPWORDS = frozenset(
    "a an and are as at be by for from has have he her his in is it its of on or she that the "
    "their them they this to was were will with".split()
)
_WORD = re.compile(r"\w+")


def tokenize(text: str, stopwords: bool = True) -> list[str]:
    """Lower-cased word tokens of ``text`` (English stop words dropped when asked)."""
    words = _WORD.findall(text.lower())
    return [w for w in words if not (stopwords and w in STOPWORDS)]


def require_text(problem: AttributionProblem, who: str) -> tuple[Sequence[str], Sequence[str]]:
    """The problem's training and query texts, or a readable error if it has none."""
    if problem.train_text is None or problem.query_text is None:
        raise ValueError(f"{who} needs the text of training examples and queries, but this task "
                         "has none; use a text task (e.g. task=facts or task=hf_lm).")
    return problem.train_text, problem.query_text


def bm25_scores(documents: Sequence[str], queries: Sequence[str], k1: float = 1.5,
                b: float = 0.75, method: str = "lucene", stopwords: bool = True) -> Tensor:
    """BM25 scores ``[n_queries, n_documents]`` (float32, ≥ 0)."""
    import bm25s

    retriever = bm25s.BM25(k1=k1, b=b, method=method)
    retriever.index([tokenize(d, stopwords) or ["<empty>"] for d in documents],
                    show_progress=False)
    rows = [retriever.get_scores(tokenize(q, stopwords)) for q in queries]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def tfidf_scores(documents: Sequence[str], queries: Sequence[str]) -> Tensor:
    """Cosine similarity of TF-IDF vectors ``[n_queries, n_documents]``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(lowercase=True, sublinear_tf=True)
    docs = vectorizer.fit_transform(list(documents))
    return torch.from_numpy((vectorizer.transform(list(queries)) @ docs.T).toarray()).float()
