"""``dattri_tracin``: dattri's TracInCP (Pruthi et al. 2020, eq. 3).

    score(q, m) = Σ_c η_c ∇θ f(z_q; θ_c) · (−∇θ L(z_m; θ_c))      ``[n_queries, n_train]``

over the problem's training checkpoints θ_c, each weighted by the learning rate η_c in
force after it (``checkpoints``: ``all``, ``last`` or N evenly spaced, as tda-bench's
``tracin``), computed by dattri 0.3.0's ``TracInAttributor`` with exact gradients. The
mapping from the problem is described in :mod:`estimators.peers.dattri_base`.
"""

from __future__ import annotations

from estimators.peers.dattri_grad_dot import DattriGradDot
from estimators.problem import AttributionProblem
from estimators.tracin import select_checkpoints


class DattriTracIn(DattriGradDot):
    """dattri's TracInCP over the problem's checkpoints.

    Args:
        checkpoints: ``last``, ``all`` or a positive integer N (evenly spaced, last included).
        modules, chunk_size: as for :class:`~estimators.peers.dattri_base.Dattri`.
    """

    name = "dattri_tracin"
    ours = "tracin"

    def __init__(self, checkpoints: str | int = "all", modules: str | None = None,
                 chunk_size: int | None = 256):
        super().__init__(modules=modules, chunk_size=chunk_size)
        if checkpoints not in ("last", "all") and not (
                isinstance(checkpoints, int) and not isinstance(checkpoints, bool)
                and checkpoints > 0):
            raise ValueError(f"checkpoints must be 'last', 'all' or a positive integer, got "
                             f"{checkpoints!r}")
        self.which = checkpoints

    def checkpoints(self, problem: AttributionProblem) -> tuple[list[dict], list[float]]:
        """``(state dicts, learning rates)`` of the selected checkpoints."""
        chosen = select_checkpoints(problem.checkpoints, self.which)
        return [c.state_dict for c in chosen], [c.lr for c in chosen]
