"""Layer-wise, factored scoring: per-layer query gradients against one chunk's layer factors.

A tracked layer's per-example gradient is G = Σₜ gₜ āₜᵀ ``[o, i]``, given by the engine's
:meth:`~estimators.gradients.GradientEngine.capture` as factors ``a [B, T, i]``,
``g [B, T, o]``. A layer-wise preconditioner (:class:`LayerPreconditioner`) maps V to
Q_S [(Q_Sᵀ V Q_A) ⊙ scale] Q_Aᵀ: the identity for ``grad_dot``, EK-FAC's eigenbasis and damped
inverse eigenvalues for ``kfac``/``ekfac`` (Grosse et al. 2023, eq. 21).

Preconditioned query gradients are kept per layer, in the score dtype
(:class:`LayerQueries`), in one of two forms:

* ``dense``: P V ``[Q, o, i]`` (in the original basis);
* ``factors``: ``left [Q, k, o]``, ``right [Q, k, i]`` with V = Σ_k left_k ⊗ right_k, optionally
  followed by ``⊙ scale`` in the preconditioner's basis (the query's own k = T tokens, exact,
  rotated into the eigenbasis), or the rank-r factors of P V (``query_rank``; Grosse et al.
  §3.2.3, "query batching"), so Q queries cost Q·k·(o + i) numbers per layer.

A chunk's scores with one layer, ⟨P V_q, G_m⟩ ``[Q, B]``, come from (:func:`layer_scores`):

* ``dense`` queries: G formed for this layer only, then one GEMM ``[Q, o·i] × [o·i, B]``;
* ``factored``: Σₜ Σ_k (gₜ · left_k)(āₜ · right_k), never forming G, B·T·Q·k·(o + i)
  multiply-adds (only without a scale);
* ``expand``: V formed from its factors for this layer, a block of queries at a time
  (bounded by the memory budget), then as dense: Q·k·o·i + B·T·o·i + Q·B·o·i.

The cheaper of the last two is taken per layer and chunk by counting multiply-adds, so
the choice depends only on the shapes: the same chunk gives the same numbers in any job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerPreconditioner:
    """P for one layer: V ↦ Q_S [(Q_Sᵀ V Q_A) ⊙ scale] Q_Aᵀ.

    Attributes:
        basis: ``(Q_S [o, o], Q_A [i, i])``, or None for the original basis.
        scale: ``[o, i]`` in that basis (EK-FAC: 1 / (Λ + λ₂ + λ)), or None for 1.
    """

    basis: tuple[Tensor, Tensor] | None = None
    scale: Tensor | None = None

    @property
    def identity(self) -> bool:
        return self.basis is None and self.scale is None


IDENTITY = LayerPreconditioner()


@dataclass
class LayerQueries:
    """One layer's preconditioned query gradients (see module docstring): ``dense``
    ``[Q, o, i]``, or ``left [Q, k, o]`` and ``right [Q, k, i]`` with an optional ``scale``
    ``[o, i]`` applied in ``basis`` (training factors are rotated into it)."""

    dense: Tensor | None = None
    left: Tensor | None = None
    right: Tensor | None = None
    scale: Tensor | None = None
    basis: tuple[Tensor, Tensor] | None = None

    @property
    def n_queries(self) -> int:
        return (self.dense if self.dense is not None else self.left).shape[0]

    @property
    def nbytes(self) -> int:
        parts = [self.dense, self.left, self.right]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def normalise(self, norms: Tensor) -> None:
        """Divides each query by ``norms [Q]`` (grad_cos), in place."""
        inv = norms.clamp_min(1e-30).reciprocal().to(self._dtype).view(-1, 1, 1)
        (self.dense if self.dense is not None else self.left).mul_(inv)

    def allocate(self, n_queries: int) -> LayerQueries:
        """An empty store of this chunk's form for ``n_queries`` queries (same k, scale and
        basis), filled chunk by chunk with :meth:`write`: one allocation per layer, where
        concatenating many small chunk tensors fragments the heap."""
        def empty(t):
            return None if t is None else t.new_empty((n_queries, *t.shape[1:]))
        return LayerQueries(dense=empty(self.dense), left=empty(self.left),
                            right=empty(self.right), scale=self.scale, basis=self.basis)

    def write(self, rows: slice, part: LayerQueries) -> None:
        """Copies a chunk's queries (same form and k) into ``rows``."""
        for mine, theirs in ((self.dense, part.dense), (self.left, part.left),
                             (self.right, part.right)):
            if mine is not None:
                mine[rows] = theirs

    @property
    def _dtype(self) -> torch.dtype:
        return (self.dense if self.dense is not None else self.left).dtype

    def squared_norms(self) -> Tensor:
        """``[Q]``: ‖V_q‖² (identity form only: no scale)."""
        if self.dense is not None:
            return self.dense.flatten(1).pow(2).sum(1)
        gram_l = self.left @ self.left.transpose(1, 2)
        gram_r = self.right @ self.right.transpose(1, 2)
        return (gram_l * gram_r).sum((1, 2))


def rotate(a: Tensor, g: Tensor, basis: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Factors in the preconditioner's basis: ``(a Q_A, g Q_S)``, T·(i² + o²) per example."""
    if basis is None:
        return a, g
    q_s, q_a = basis
    return a @ q_a.to(a.dtype), g @ q_s.to(g.dtype)


def outer(a: Tensor, g: Tensor, workspace: Workspace | None = None) -> Tensor:
    """``[B, o, i]``: Σₜ gₜ āₜᵀ per example (into ``workspace``'s buffer when given)."""
    b, _, i = a.shape
    out = workspace.get((b, g.shape[-1], i), a.dtype, a.device) if workspace is not None \
        else None
    return torch.bmm(g.transpose(1, 2), a, out=out)


class Workspace:
    """One reusable buffer for transient per-chunk ``[B, o, i]`` gradients (scoring, EK-FAC's
    eigenvalue pass).

    A fresh multi-MB tensor per layer and chunk costs a page fault per 4 kB on CPU (the
    allocator returns large blocks to the system), which took longer than the product that
    fills it; the buffer grows to the largest shape asked for and is reused. A view it
    returns is valid until the next :meth:`get`.
    """

    def __init__(self):
        self.buffer: Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype \
                or buffer.device != device:
            buffer = self.buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _concat_factors(parts: list[Tensor]) -> Tensor:
    """``[Q_c, k_c, d]`` chunks -> ``[Q, max k, d]``, zero-padded (zeros add nothing)."""
    k = max(p.shape[1] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, k - p.shape[1])) for p in parts]
    return torch.cat(padded)


def concat(chunks: list[LayerQueries]) -> LayerQueries:
    """The layer's queries of several query chunks, in order (one form throughout); a single
    chunk is returned as it is (no copy)."""
    first = chunks[0]
    if len(chunks) == 1:
        return first
    if first.dense is not None:
        return LayerQueries(dense=torch.cat([c.dense for c in chunks]))
    return LayerQueries(left=_concat_factors([c.left for c in chunks]),
                        right=_concat_factors([c.right for c in chunks]),
                        scale=first.scale, basis=first.basis)


def factored_cost(batch: int, tokens: int, queries: int, rank: int, o: int, i: int) -> int:
    return batch * tokens * queries * rank * (o + i + 1)


def expand_cost(batch: int, tokens: int, queries: int, rank: int, o: int, i: int) -> int:
    return queries * rank * o * i + batch * tokens * o * i + queries * batch * o * i


def layer_scores(q: LayerQueries, a: Tensor, g: Tensor, dtype: torch.dtype,
                 expand_bytes: float, workspace: Workspace | None = None) -> Tensor:
    """``[Q, B]``: ⟨P V_q, G_b⟩ for one layer of one training chunk (see module docstring).

    Args:
        q: the layer's stored queries.
        a: ``[B, T, i]`` layer inputs; g: ``[B, T, o]`` output gradients.
        dtype: the dtype of the arithmetic (the score dtype; bf16 factors accumulate in fp32).
        expand_bytes: at most this many bytes of queries are expanded at once.
        workspace: where the layer's ``[B, o, i]`` gradients are formed (reused across calls).
    """
    a, g = rotate(a.to(dtype), g.to(dtype), q.basis)
    b, t, i = a.shape
    o = g.shape[-1]
    if q.dense is not None:
        return q.dense.flatten(1) @ outer(a, g, workspace).flatten(1).T
    n_q, k = q.left.shape[:2]
    if q.scale is None and factored_cost(b, t, n_q, k, o, i) <= expand_cost(b, t, n_q, k, o, i):
        left = g.reshape(b * t, o) @ q.left.reshape(n_q * k, o).T  # [B·T, Q·k]
        right = a.reshape(b * t, i) @ q.right.reshape(n_q * k, i).T
        return (left * right).reshape(b, t, n_q, k).sum((1, 3)).T
    grads = outer(a, g, workspace).flatten(1)  # [B, o·i], this layer only
    out = torch.empty(n_q, b, dtype=dtype, device=a.device)
    block = max(1, int(expand_bytes // max(1, o * i * grads.element_size())))
    for s in range(0, n_q, block):
        v = torch.einsum("qko,qki->qoi", q.left[s:s + block], q.right[s:s + block])
        if q.scale is not None:
            v.mul_(q.scale)  # in place: the plan counts one expanded block (expand_bytes)
        out[s:s + block] = v.flatten(1) @ grads.T
    return out


def self_terms(pre: LayerPreconditioner, a: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B]``: ⟨G_b, P G_b⟩ for one layer (self-influence; ‖G_b‖² for the identity)."""
    a, g = rotate(a.to(dtype), g.to(dtype), pre.basis)
    t, i, o = a.shape[1], a.shape[2], g.shape[2]
    if pre.scale is None and t * (o + i) < o * i:  # Σ_{t,s} (gₜ·gₛ)(āₜ·āₛ), G never formed
        return ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
    grads = outer(a, g)
    return (grads.pow(2) * pre.scale).sum((1, 2)) if pre.scale is not None else \
        grads.pow(2).sum((1, 2))


def _sandwich(left: Tensor, v: Tensor, right: Tensor) -> Tensor:
    """``[Q, o, i]`` -> left V right for every query: one flat GEMM ``[Q·o, i] × [i, i]``,
    then a batched product with ``left``."""
    n_q, o, i = v.shape
    return left @ (v.reshape(n_q * o, i) @ right).reshape(n_q, o, i)


def precondition_dense(pre: LayerPreconditioner, v: Tensor) -> Tensor:
    """``[Q, o, i]`` -> P V in the original basis."""
    if pre.basis is None:
        return v * pre.scale if pre.scale is not None else v
    q_s, q_a = (m.to(v.dtype) for m in pre.basis)
    return _unrotate(pre, _sandwich(q_s.T, v, q_a))


def precondition_tokens(pre: LayerPreconditioner, a: Tensor, g: Tensor) -> Tensor:
    """``a [Q, T, i]``, ``g [Q, T, o]`` -> P V, V = Σₜ gₜ āₜᵀ, in the original basis. With few
    tokens, Q_Sᵀ V Q_A is formed from the rotated tokens, T·(o² + i² + o·i) multiply-adds per
    query instead of rotating the formed V's o·i·(o + i)."""
    t, o, i = g.shape[1], g.shape[2], a.shape[2]
    if pre.basis is None or t * (o * o + i * i + o * i) >= o * i * (o + i):
        return precondition_dense(pre, outer(a, g))
    return _unrotate(pre, outer(*rotate(a, g, pre.basis)))


def _unrotate(pre: LayerPreconditioner, rotated: Tensor) -> Tensor:
    """``[Q, o, i]`` in the eigenbasis -> Q_S (rotated ⊙ scale) Q_Aᵀ."""
    if pre.scale is not None:
        rotated = rotated * pre.scale
    q_s, q_a = (m.to(rotated.dtype) for m in pre.basis)
    return _sandwich(q_s, rotated, q_a.T)


def store_chunk(pre: LayerPreconditioner, a: Tensor, g: Tensor, dtype: torch.dtype,
                form: str, low_rank=None) -> LayerQueries:
    """One query chunk's stored queries for one layer.

    Args:
        pre: the layer's preconditioner.
        a: ``[Q, T, i]``; g: ``[Q, T, o]`` (the queries' captured factors).
        form: ``dense`` or ``factors``.
        low_rank: ``None``, or a callable ``[Q, o, i] -> (left [Q, r, o], right [Q, r, i])``
            that truncates P V (applied to layers where the rank is below min(o, i)).
    """
    a, g = a.to(dtype), g.to(dtype)
    if low_rank is not None:
        rotated_a, rotated_g = rotate(a, g, pre.basis)
        v = outer(rotated_a, rotated_g)
        if pre.scale is not None:
            v = v * pre.scale
        left, right = low_rank(v)  # in the preconditioner's basis
        if pre.basis is not None:
            q_s, q_a = (m.to(dtype) for m in pre.basis)
            left, right = left @ q_s.T, right @ q_a.T
        return LayerQueries(left=left, right=right)
    if form == "dense":
        return LayerQueries(dense=precondition_tokens(pre, a, g))
    if pre.identity:
        return LayerQueries(left=g, right=a)
    rotated_a, rotated_g = rotate(a, g, pre.basis)
    return LayerQueries(left=rotated_g, right=rotated_a, scale=pre.scale, basis=pre.basis)


def randomized_svd(v: Tensor, rank: int, oversampling: int, iterations: int,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of each ``[Q, o, i]`` matrix by a seeded randomized SVD
    (Halko, Martinsson & Tropp 2011, Alg. 4.4: range finder with ``iterations`` power
    iterations and ``oversampling`` extra columns).

    Returns:
        ``(left [Q, r, o], right [Q, r, i])`` with V ≈ Σ_r left_r ⊗ right_r (singular values
        folded into ``left``).
    """
    n_q, o, i = v.shape
    width = min(rank + oversampling, o, i)
    omega = torch.randn(i, width, generator=generator, dtype=torch.float64).to(v)
    y, _ = torch.linalg.qr(v @ omega)  # [Q, o, w]
    for _ in range(iterations):
        z, _ = torch.linalg.qr(v.transpose(1, 2) @ y)
        y, _ = torch.linalg.qr(v @ z)
    small = y.transpose(1, 2) @ v  # [Q, w, i]
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = y @ u[..., :rank]  # [Q, o, r]
    return (u * s[:, None, :rank]).transpose(1, 2), vh[:, :rank]


def exact_svd(v: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors (truncated SVD) of each ``[Q, o, i]`` matrix."""
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    return (u[..., :rank] * s[:, None, :rank]).transpose(1, 2), vh[:, :rank]
