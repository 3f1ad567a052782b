"""Counterfactual proponent removal (Grosse et al. 2023; truth :mod:`bench.truths.removal`).

``removal_drop``: per tested query, the drop of f after retraining without the query's top
proponents, paired by seed (NaN for untested queries), averaged with its standard error;
``removal_drop_random``: the same for random removals (the baseline); ``removal_k``,
``removal_queries``, ``removal_seconds``: examples removed per query, queries tested, time.
"""

from __future__ import annotations

import numpy as np

from bench.metrics.registry import Metric, register_metric


def _drops(key: str):
    def values(scores, truth: dict) -> np.ndarray:
        column = np.full(scores.shape[0], np.nan)
        column[truth["queries"].numpy()] = truth[key].double().numpy()
        return column
    return values


register_metric(Metric("removal_drop", needs="removal", role="diagnostic", sem=True, order=60,
                       values=_drops("drop"),
                       doc="drop of f after retraining without each query's top proponents"))
register_metric(Metric("removal_drop_random", needs="removal", role="diagnostic", sem=True,
                       order=61, values=_drops("drop_random"),
                       baseline=("random removal", "removal_drop"),
                       doc="the same drop after removing as many random training examples"))
for _key, _order, _doc in (("removal_k", 62, "training examples removed per query"),
                           ("removal_queries", 63, "queries tested")):
    register_metric(Metric(_key, needs="removal", role="info", order=_order, printed=False,
                           values=lambda scores, t, key=_key: (
                               float(t["proponents"].shape[1]) if key == "removal_k"
                               else float(len(t["queries"]))), doc=_doc))
register_metric(Metric("removal_seconds", needs="removal", role="info", order=64, printed=False,
                       values=lambda scores, t: t["seconds"],
                       doc="seconds of the removal test (retraining included)"))
