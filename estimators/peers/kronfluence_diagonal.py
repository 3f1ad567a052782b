"""``kronfluence_diagonal``: kronfluence's diagonal Fisher preconditioner.

    score(q, m) = −Σᵢ ∂ᵢf(z_q) ∂ᵢL(z_m) / (F̂ᵢᵢ + λ)      ``[n_queries, n_train]``

with F̂ᵢᵢ = (1/N) Σₙ (∂ᵢLₙ)² the diagonal of the Fisher over the tracked parameters (the
diagonal baseline of Grosse et al. 2023 §3.1), computed by kronfluence 1.0.1. tda-bench has
no diagonal estimator of its own. The mapping from the problem and the damping are described
in :mod:`estimators.peers.kronfluence_base`.
"""

from __future__ import annotations

from estimators.peers.kronfluence_base import Kronfluence


class KronfluenceDiagonal(Kronfluence):
    """kronfluence's ``diagonal`` strategy (arguments: :class:`Kronfluence`)."""

    strategy = "diagonal"
    name = "kronfluence_diagonal"
