"""Training-data attribution estimators, one module each, all behind :class:`Estimator`.

An estimator is instantiated from ``conf/estimator/<name>.yaml`` (the config group is the
registry), fitted once on an :class:`~estimators.problem.AttributionProblem`, and returns a
score matrix ``[n_queries, n_train]`` (positive = proponent) from ``score``.
"""

from estimators.base import Estimator, GradientEstimator
from estimators.problem import AttributionProblem, Checkpoint

__all__ = ["AttributionProblem", "Checkpoint", "Estimator", "GradientEstimator"]
