"""``kronfluence_kfac``: kronfluence's K-FAC (Martens & Grosse 2015; Grosse et al. 2023 §3.1).

    score(q, m) = −∇θ f(z_q)ᵀ (A ⊗ S + λI)⁻¹ ∇θ L(z_m)      ``[n_queries, n_train]``

per tracked layer, through the eigendecompositions of A and S (eigenvalues sᵢaⱼ, eq. 18),
computed by kronfluence 1.0.1; tda-bench's ``kfac`` is the same method. The mapping from
the problem and the damping are described in :mod:`estimators.peers.kronfluence_base`.
"""

from __future__ import annotations

from estimators.peers.kronfluence_base import Kronfluence


class KronfluenceKFAC(Kronfluence):
    """kronfluence's ``kfac`` strategy (arguments: :class:`Kronfluence`)."""

    strategy = "kfac"
    name = "kronfluence_kfac"
