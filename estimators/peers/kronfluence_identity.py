"""``kronfluence_identity``: kronfluence with no preconditioner (H⁻¹ replaced by I).

    score(q, m) = −∇θ f(z_q) · ∇θ L(z_m)      ``[n_queries, n_train]``

the gradient dot product, tda-bench's ``grad_dot``, computed by kronfluence 1.0.1 (its
``identity`` strategy). It fits nothing, so it takes no Fisher, damping or seed. The mapping
from the problem is described in :mod:`estimators.peers.kronfluence_base`.
"""

from __future__ import annotations

from estimators.peers.kronfluence_base import Kronfluence


class KronfluenceIdentity(Kronfluence):
    """kronfluence's ``identity`` strategy.

    Args:
        modules, chunk_size, query_batch_size, scratch_dir, keep_scratch: as for
            :class:`Kronfluence`.
    """

    strategy = "identity"
    name = "kronfluence_identity"

    def __init__(self, modules: str | None = None, chunk_size: int = 256,
                 query_batch_size: int | None = None, scratch_dir: str | None = None,
                 keep_scratch: bool = False):
        super().__init__(fisher="empirical", modules=modules, chunk_size=chunk_size,
                         query_batch_size=query_batch_size, scratch_dir=scratch_dir,
                         keep_scratch=keep_scratch)
