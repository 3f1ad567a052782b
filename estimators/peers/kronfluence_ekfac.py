"""``kronfluence_ekfac``: kronfluence's EK-FAC (George et al. 2018; Grosse et al. 2023 §3.2).

    score(q, m) = −∇θ f(z_q)ᵀ Q [(Qᵀ ∇L(z_m)) ⊘ (Λ + λ)]      ``[n_queries, n_train]``

with Q = Q_A ⊗ Q_S the K-FAC eigenbasis and Λ the eigenvalues re-fitted on per-example
gradients (Grosse et al. eq. 20-21), computed by kronfluence 1.0.1; tda-bench's ``ekfac`` is
the same method. The mapping from the problem and the damping are described in
:mod:`estimators.peers.kronfluence_base`.
"""

from __future__ import annotations

from estimators.peers.kronfluence_base import Kronfluence


class KronfluenceEKFAC(Kronfluence):
    """kronfluence's ``ekfac`` strategy (arguments: :class:`Kronfluence`)."""

    strategy = "ekfac"
    name = "kronfluence_ekfac"
