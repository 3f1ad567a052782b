"""``dattri_grad_cos``: dattri's Grad-Cos (TracIn at the final checkpoint, unit gradients).

    score(q, m) = −(∇θ f(z_q) / ‖∇θ f(z_q)‖) · (∇θ L(z_m) / ‖∇θ L(z_m)‖)   ``[n_queries, n_train]``

tda-bench's ``grad_cos``, computed by dattri 0.3.0's ``TracInAttributor`` with one
checkpoint, weight 1, ``normalized_grad`` and exact gradients. The mapping from the problem
is described in :mod:`estimators.peers.dattri_base`.
"""

from __future__ import annotations

from estimators.peers.dattri_grad_dot import DattriGradDot


class DattriGradCos(DattriGradDot):
    """dattri's gradient cosine (arguments: :class:`~estimators.peers.dattri_base.Dattri`)."""

    name = "dattri_grad_cos"
    ours = "grad_cos"
    normalized = True
