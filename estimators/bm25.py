"""``bm25``: lexical retrieval, no model at all (Robertson & Zaragoza 2009).

    score(q, m) = Σ_{t ∈ q} IDF(t) · tf(t, m) (k1 + 1) / (tf(t, m) + k1 (1 − b + b |m| / avgdl))

over the training documents' text and the query text (prompt plus target, as in Chang et
al. 2024, §4). Implemented with ``bm25s``; tokens are lower-cased word characters, with an
optional English stop-word list. A strong attribution baseline for fact tracing: it finds
the documents that *state* a fact, which need not be the ones that *influence* the model.
"""

from __future__ import annotations

from torch import Tensor

from estimators.base import Estimator
from estimators.lexical import bm25_scores, require_text
from estimators.options import bounded, flag, positive
from estimators.problem import AttributionProblem


class BM25(Estimator):
    """BM25 over training-document text vs query text (see module docstring).

    Args:
        k1: term-frequency saturation.
        b: length normalisation.
        method: bm25s variant (``lucene``, ``robertson``, ``atire``, ``bm25l``, ``bm25+``).
        stopwords: drop English stop words.
    """

    needs_text = True  # the harness refuses a task without text before any work

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stopwords: bool = True):
        self.k1 = positive("k1", k1)
        self.b = bounded("b", b, 0, 1)
        self.method, self.stopwords = method, flag("stopwords", stopwords)

    def score(self, problem: AttributionProblem) -> Tensor:
        documents, queries = require_text(problem, "bm25")
        return bm25_scores(documents, queries, self.k1, self.b, self.method, self.stopwords)
