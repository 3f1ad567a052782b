"""Attribution tasks: data, model, Lightning training and measurement, one module per task.

A task turns its config and a seed into a trained model and an
:class:`~estimators.problem.AttributionProblem`, and retrains on subsets for ground truth.
"""

from tasks.base import Task

__all__ = ["Task"]
