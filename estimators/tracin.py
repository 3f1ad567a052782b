"""``tracin``: TracInCP, influence traced over training checkpoints (Pruthi et al. 2020, eq. 3).

    score(q, m) = Σ_c η_c ∇θ f(z_q; θ_c) · (−∇θ L(z_m; θ_c))

summed over checkpoints θ_c recorded during training, each weighted by the learning rate η_c
in force after it (DESIGN.md sign convention: −∇L is the direction a step on z_m moves θ).
H⁻¹ is replaced by the identity at every checkpoint; with one checkpoint TracIn is
``grad_dot`` times the learning rate. Self-influence (Pruthi et al. §4, mislabel
detection) is Σ_c η_c ‖∇L(z_m; θ_c)‖².

Each checkpoint's parameters are loaded into a copy of the attributed model; gradients come
from the shared engine (optionally projected, :mod:`estimators.projection`).
"""

from __future__ import annotations

import copy
import dataclasses

from torch import Tensor

from estimators.base import GradientEstimator
from estimators.options import OptionError, literal
from estimators.problem import AttributionProblem, Checkpoint


def select_checkpoints(checkpoints: list[Checkpoint], which: str | int) -> list[Checkpoint]:
    """``last``, ``all``, or N evenly spaced checkpoints ending with the last one."""
    if not checkpoints:
        raise ValueError("tracin needs training checkpoints, but the problem has none; set "
                         "the task's checkpoints (e.g. task.checkpoints={every_n_epochs: 5}).")
    if which == "last":
        return checkpoints[-1:]
    if which == "all":
        return list(checkpoints)
    n = int(which)
    if n > len(checkpoints):
        raise OptionError(f"tracin {{checkpoints}}={n}, but training recorded only "
                          f"{len(checkpoints)}; use {{checkpoints=all}} or record more.")
    return [checkpoints[round((k + 1) * len(checkpoints) / n) - 1] for k in range(n)]


class TracIn(GradientEstimator):
    """TracInCP over the problem's checkpoints (see module docstring).

    Args:
        checkpoints: ``last``, ``all`` or a positive integer N (evenly spaced, last included).
        **kwargs: ``modules``, ``chunk_size``, ``per_layer``, ``projection_*``, ``index_dir``,
            ``candidates`` (see :class:`~estimators.base.GradientEstimator`).
    """

    def __init__(self, checkpoints: str | int = "all", **kwargs):
        super().__init__(**kwargs)
        if checkpoints not in ("last", "all"):
            try:
                if int(checkpoints) <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise OptionError(f"{{checkpoints}} must be 'last', 'all' or a positive integer, "
                                  f"got {literal(checkpoints)}") from None
        self.checkpoints = checkpoints

    def _at(self, problem: AttributionProblem, checkpoint: Checkpoint) -> AttributionProblem:
        """The problem with the model replaced by a copy holding ``checkpoint``'s parameters."""
        model = copy.deepcopy(problem.model)
        model.load_state_dict(checkpoint.state_dict)
        return dataclasses.replace(problem, model=model.to(problem.device))

    def score(self, problem: AttributionProblem) -> Tensor:
        total = self.score_columns(problem, None)
        if self.per_layer:
            self.layer_scores = total
            return total.sum(0)
        return total

    def score_columns(self, problem: AttributionProblem, columns: Tensor | None) -> Tensor:
        """Σ_c η_c (scores at checkpoint c) of the training examples ``columns`` (all if
        None), per layer when ``per_layer``."""
        total = None
        for c in select_checkpoints(problem.checkpoints, self.checkpoints):
            scores = c.lr * self.score_model(self._at(problem, c), columns=columns)
            total = scores if total is None else total + scores
        return total

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        total = None
        for c in select_checkpoints(problem.checkpoints, self.checkpoints):
            values = c.lr * self.self_influence_model(self._at(problem, c))
            total = values if total is None else total + values
        return total
