"""tda-bench as a library: your own model and data, the benchmark's estimators, ground truth
and metrics (docs/library.md).

    problem = tda_bench.classification_problem(model, (x, y), (x_q, y_q), l2=1e-3)
    # or regression_problem(...), causal_lm_problem(model, tokenizer, docs, queries)
    est = tda_bench.estimator("ekfac")            # conf/estimator/ekfac.yaml's defaults
    est.fit(problem)
    scores = est.score(problem)                   # [n_queries, n_train], positive = proponent
    truth = tda_bench.ground_truth.lds(train_fn, problem, subsets=50)
    tda_bench.metrics.lds(scores, truth)

A thin facade: the problem contract is :mod:`estimators.problem`, the estimators are the
config group ``conf/estimator/`` (:func:`estimator`; the classes by their names, e.g.
``tda_bench.EKFAC``), ground truth runs through :mod:`bench.ground_truth`, metrics are the
specs of :mod:`bench.metrics`.
"""

from __future__ import annotations

import functools

from estimators.base import Estimator, GradientEstimator
from estimators.problem import (
    AttributionProblem,
    Checkpoint,
    TailPatch,
    cross_entropy_sum,
    eval_mode,
    sample_categorical,
)
from tda_bench import ground_truth, metrics
from tda_bench.estimator_group import (
    estimator,
    estimator_class,
    estimator_config,
    estimator_names,
)
from tda_bench.problems import causal_lm_problem, classification_problem, regression_problem


@functools.cache
def _classes() -> dict[str, str]:
    """Estimator class name -> config name, from the YAMLs' ``_target_``."""
    return {estimator_config(n)["_target_"].rsplit(".", 1)[1]: n for n in estimator_names()}


def __getattr__(name: str):
    """The estimator classes by name (``tda_bench.EKFAC``), found through the config group."""
    if name[:1].isupper() and name in _classes():
        return estimator_class(_classes()[name])
    raise AttributeError(f"module 'tda_bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_classes()])


__all__ = ["AttributionProblem", "Checkpoint", "Estimator", "GradientEstimator", "TailPatch",
           "causal_lm_problem", "classification_problem", "cross_entropy_sum", "estimator",
           "estimator_class", "estimator_config", "estimator_names", "eval_mode",
           "ground_truth", "metrics", "regression_problem", "sample_categorical"]
