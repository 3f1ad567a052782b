"""Seeded random projections of per-example gradients, shared by every gradient estimator.

A projection R ``[P, d]`` with i.i.d. entries of mean 0 and variance 1/d preserves inner
products in expectation, E[(Rᵀx)·(Rᵀy)] = x·y, with relative error O(1/√d)
(Johnson-Lindenstrauss; used by TRAK, Park et al. 2023, §3.2, and TrackStar, Chang et al.
2024). Entries are Rademacher (±1/√d) or Gaussian (N(0, 1/d)).

The matrix is never held whole. It is applied in one of two forms:

* **kronecker** (LoGra, Choe et al. 2024): each layer gets its own share ``d_l`` of the budget
  ``d`` (proportional to its parameter count) and its own seed. A layer's per-example gradient is
  ``G = Σ_t g_t ā_tᵀ`` (output gradient ⊗ input), so (R_o ⊗ R_a)ᵀ vec(G) = Σ_t (R_oᵀ g_t)
  (R_aᵀ ā_t)ᵀ, shape ``[d_o, d_a]`` with d_o·d_a ≈ d_l, computed from the engine's
  :meth:`~estimators.gradients.GradientEngine.capture` without ever forming G. Valid when
  the estimator applies no element-wise correction to G.
* **sparse** (CountSketch; Clarkson & Woodruff 2013, the s = 1 sparse JL transform of Kane &
  Nelson 2014): each parameter j of the tracked layers goes to one seeded bucket h(j) of the
  d with a seeded sign s(j), y[h(j)] += s(j)·x[j]. E[(Sx)·(Sy)] = x·y with variance at most
  2‖x‖²‖y‖²/d, like a dense projection, at O(P) time per example and O(P) memory whatever
  d is: the projection for large d (2¹⁶ and beyond) on materialised gradients.
* **dense**: one R ``[P, d]`` over all tracked parameters; x R = Σ_l x_l R_l is computed one
  layer at a time from that layer's per-example gradients ``[B, o·i]``, the rows of R_l
  generated block by block (``block_rows`` at a time, each block from its own seed), so
  memory is O(B × largest layer + block_rows × d) and the numbers do not depend on the
  caller's chunking. For estimators that rescale G element-wise first (TrackStar's optimizer
  correction), and wherever accuracy per dimension matters.

Projected gradients keep the engine's layout ``{layer: [B, d_o, d_a]}`` (one entry
``{"projected": [B, 1, d]}`` for dense), so :func:`~estimators.gradients.dot`,
``squared_norm`` and ``scale`` apply unchanged.
A given (seed, kind, d, model layout) gives identical numbers on every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from estimators.gradients import GradientEngine, LayerGrads
from estimators.options import KINDS, ProjectionOptions, choice, positive
from estimators.problem import Batch

# Bump whenever the numbers a given configuration produces change: it keys gradient indexes.
VERSION = 2


def random_matrix(rows: int, cols: int, kind: str, seed: int, dtype=torch.float32) -> Tensor:
    """``[rows, cols]`` entries with mean 0 and variance 1/cols, from a seeded generator."""
    gen = torch.Generator().manual_seed(int(seed) % (2**63 - 1))
    choice("projection_kind", kind, KINDS)
    values = torch.randn(rows, cols, generator=gen, dtype=dtype)
    if kind == "rademacher":  # the sign of a Gaussian is a fair ±1
        values.sign_()
    return values.div_(math.sqrt(cols))


def dense_project(x: Tensor, dim: int, kind: str, seed: int, block_rows: int = 4096) -> Tensor:
    """``x [B, n] -> [B, dim]``: x @ R with R ``[n, dim]`` generated ``block_rows`` rows at a
    time (row block k from seed ``seed·1_000_003 + k``), never whole."""
    out = torch.zeros(x.shape[0], dim, dtype=torch.float32, device=x.device)
    for k, start in enumerate(range(0, x.shape[1], block_rows)):
        stop = min(start + block_rows, x.shape[1])
        block = random_matrix(stop - start, dim, kind, seed * 1_000_003 + k).to(x.device)
        out += x[:, start:stop].to(torch.float32) @ block
    return out


def sparse_buckets(size: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """CountSketch's seeded map of ``size`` coordinates: bucket ``[size]`` int32 in [0, dim)
    and sign ``[size]`` int8 ±1 (5 bytes per parameter)."""
    gen = torch.Generator().manual_seed(int(seed) % (2**63 - 1))
    bucket = torch.randint(0, int(dim), (int(size),), generator=gen).to(torch.int32)
    sign = torch.randint(0, 2, (int(size),), generator=gen).to(torch.int8).mul_(2).sub_(1)
    return bucket, sign


def _finite(name: str, grad: Tensor) -> Tensor:
    if not torch.isfinite(grad).all():
        raise FloatingPointError(
            f"Non-finite gradient in layer '{name}': check the inputs, lower the training "
            "learning rate, or train in float64 (the model's loss or measurement overflowed).")
    return grad


@dataclass(frozen=True)
class LayerPlan:
    """How one layer ``[o, i]`` is projected: to ``[d_o, d_a]`` (kronecker) or ``[1, d]``."""

    name: str
    o: int
    i: int
    d_o: int
    d_a: int
    seed: int

    @property
    def dim(self) -> int:
        return self.d_o * self.d_a


def _factor(budget: int, o: int, i: int) -> tuple[int, int]:
    """``(d_o, d_a)`` with d_o·d_a ≤ budget, d_o ≤ o, d_a ≤ i, minimising the Kronecker
    projection's relative variance ≈ 1/d_o + 1/d_a (a side kept whole adds nothing)."""
    best = None
    for d_o in range(1, o + 1):
        d_a = min(i, max(1, budget // d_o))
        err = (0.0 if d_o == o else 1.0 / d_o) + (0.0 if d_a == i else 1.0 / d_a)
        if best is None or (err, -d_o * d_a) < best[0]:
            best = ((err, -d_o * d_a), d_o, d_a)
    return best[1], best[2]


DENSE = "projected"  # the single key of a dense (or sparse) projection's output
FLAT = ("dense", "sparse")  # structures with one [P, d] map over all tracked parameters


class Projector:
    """A seeded random projection of a model's tracked-layer gradients to ≈ ``dim`` numbers.

    Args:
        engine: the gradient engine whose layers are projected.
        dim: projected dimension d (Kronecker: split across layers by parameter count).
        kind: ``rademacher`` or ``gaussian``.
        seed: the projection's seed.
        structure: ``kronecker`` (per layer, from captured inputs and output gradients; output
            ``{layer: [B, d_o, d_a]}``), ``dense`` (one [P, d] matrix over all tracked
            parameters, applied layer by layer to materialised gradients, its rows generated
            in blocks; output ``{"projected": [B, 1, d]}``, identity when d ≥ P) or
            ``sparse`` (CountSketch of the materialised gradients; the same output).
        block_rows: rows of a dense projection generated at a time.
    """

    def __init__(self, engine: GradientEngine, dim: int, kind: str = "rademacher", seed: int = 0,
                 structure: str = "kronecker", block_rows: int = 4096):
        options = ProjectionOptions(positive("projection_dim", dim, integer=True), kind, seed,
                                    structure)  # validated; a Projector always has a dim
        dim, structure = options.dim, options.structure
        self.engine, self.kind, self.seed = engine, options.kind, options.seed
        self.structure, self.block_rows = structure, int(block_rows)
        sizes = [o * i for o, i in (layer.shape for layer in engine.layers)]
        self.layer_seeds = [self.seed * 7919 + n for n in range(len(sizes))]
        flat = structure in FLAT
        self.identity = flat and int(dim) >= sum(sizes)
        if flat:
            self.plans = [LayerPlan(DENSE, 1, sum(sizes), 1, min(int(dim), sum(sizes)),
                                    self.seed)]
        else:
            self.plans = []
            for layer, size, layer_seed in zip(engine.layers, sizes, self.layer_seeds,
                                               strict=True):
                o, i = layer.shape
                d_o, d_a = _factor(max(1, round(int(dim) * size / sum(sizes))), o, i)
                self.plans.append(LayerPlan(layer.name, o, i, d_o, d_a, layer_seed))
        self._factors: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self._buckets: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def dim(self) -> int:
        """The actual projected dimension (Kronecker: the sum of the layers' shares)."""
        return sum(p.dim for p in self.plans)

    def describe(self) -> dict:
        """What determines the projection's numbers (for cache keys)."""
        return {"version": VERSION, "kind": self.kind, "seed": self.seed,
                "structure": self.structure,
                "block_rows": self.block_rows,
                "layers": [(p.name, p.o, p.i, p.d_o, p.d_a) for p in self.plans]}

    def _kron_factors(self, plan: LayerPlan, device) -> tuple[Tensor | None, Tensor | None]:
        """R_o ``[o, d_o]`` and R_a ``[i, d_a]``; None where a side keeps its full size."""
        if plan.name not in self._factors:
            r_o = None if plan.d_o == plan.o else random_matrix(plan.o, plan.d_o, self.kind,
                                                                plan.seed * 2)
            r_a = None if plan.d_a == plan.i else random_matrix(plan.i, plan.d_a, self.kind,
                                                                plan.seed * 2 + 1)
            self._factors[plan.name] = (r_o, r_a)
        r_o, r_a = self._factors[plan.name]
        return (None if r_o is None else r_o.to(device)), (None if r_a is None else r_a.to(device))

    def project(self, fn: Callable, batch: Batch,
                correct: Callable[[LayerGrads], LayerGrads] | None = None) -> LayerGrads:
        """Projected per-example gradients of ``fn(model, batch)`` (layout: see class).

        Args:
            correct: an element-wise map of full gradients ``{layer: [B, o, i]}`` applied
                before projecting, called one layer at a time (so that only one layer's
                per-example gradients are in memory). With ``kronecker`` the corrected
                gradient G is materialised and projected as R_oᵀ G R_a (the same numbers as
                the factored path when there is no correction).
        """
        captured = self.engine.capture(fn, batch)
        if self.structure in FLAT:  # one layer's per-example gradients at a time
            parts = []
            for n, (name, (a, g)) in enumerate(captured.items()):
                grad = {name: _finite(name, torch.einsum("bto,bti->boi", g, a))}
                parts.append(self._dense_part(n, (correct(grad) if correct else grad)[name]))
                del grad
            return self._dense_total(parts)
        out = {}
        if correct is not None:
            for plan, (name, (a, g)) in zip(self.plans, captured.items(), strict=True):
                grad = correct({name: _finite(name, torch.einsum("bto,bti->boi", g, a))})[name]
                r_o, r_a = self._kron_factors(plan, a.device)
                grad = grad.to(torch.float32)
                grad = grad if r_a is None else grad @ r_a
                out[name] = grad if r_o is None else r_o.T @ grad
            return out
        for plan, (name, (a, g)) in zip(self.plans, captured.items(), strict=True):
            r_o, r_a = self._kron_factors(plan, a.device)
            a = a.to(torch.float32) if r_a is None else a.to(torch.float32) @ r_a
            g = g.to(torch.float32) if r_o is None else g.to(torch.float32) @ r_o
            out[name] = _finite(name, torch.einsum("bto,bti->boi", g, a))
        return out

    def _dense_part(self, n: int, grad: Tensor) -> Tensor:
        """Layer ``n``'s gradients ``[B, o, i]`` times its rows of R: ``[B, d]``."""
        x = grad.flatten(1).to(torch.float32)
        if self.identity:
            return x
        if self.structure == "sparse":
            if n not in self._buckets:
                self._buckets[n] = sparse_buckets(x.shape[1], self.plans[0].dim,
                                                  self.layer_seeds[n])
            bucket, sign = (t.to(x.device) for t in self._buckets[n])
            out = torch.zeros(x.shape[0], self.plans[0].dim, dtype=torch.float32,
                              device=x.device)
            return out.index_add_(1, bucket, x * sign)
        return dense_project(x, self.plans[0].dim, self.kind, self.layer_seeds[n],
                             self.block_rows)

    def _dense_total(self, parts: list[Tensor]) -> LayerGrads:
        total = torch.cat(parts, dim=1) if self.identity else sum(parts)
        return {DENSE: total[:, None, :]}

    def project_gradients(self, grads: LayerGrads) -> LayerGrads:
        """Dense projection of materialised gradients ``{layer: [B, o, i]} -> {"projected":
        [B, 1, d]}`` (for estimators that correct gradients first, e.g. TrackStar)."""
        if self.structure not in FLAT:
            raise ValueError("project_gradients needs projection structure 'dense' or "
                             "'sparse'.")
        names = [layer.name for layer in self.engine.layers]
        return self._dense_total([self._dense_part(n, grads[name])
                                  for n, name in enumerate(names)])

    def flatten(self, projected: LayerGrads) -> Tensor:
        """``{layer: [B, d_o, d_a]} -> [B, dim]``."""
        return torch.cat([projected[p.name].flatten(1) for p in self.plans], dim=1)

    def unflatten(self, flat: Tensor) -> LayerGrads:
        """``[B, dim] -> {layer: [B, d_o, d_a]}``."""
        out, start = {}, 0
        for p in self.plans:
            out[p.name] = flat[:, start:start + p.dim].reshape(-1, p.d_o, p.d_a)
            start += p.dim
        return out
