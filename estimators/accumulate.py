"""Sums over the training set that do not depend on how it was split.

A fit statistic (K-FAC's covariances, EK-FAC's eigenvalues) is a sum over blocks of examples.
Each block's term is computed the same way in any job (the block's examples and shapes are
fixed), and the terms are added as float64 *double-double* pairs (hi, lo) with Knuth's
error-free TwoSum (Dekker 1971; Knuth, TAOCP vol. 2 §4.2.2), so hi + lo carries the exact
sum to about 2⁻¹⁰⁶ relative whatever the order or grouping of the terms; it is rounded to
float64 once, at the end. Sharded jobs that each sum their blocks and a merge that adds the
shards' pairs therefore give the same bits as one job that adds every block in order (up to
a sum lying within that margin of a float64 rounding boundary, which the tests have never
met).

Symmetric matrices (covariances) are stored as their upper triangle, half the memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, e)`` with s = fl(a + b) and a + b = s + e exactly (float64 tensors)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


class Compensated:
    """A float64 sum of tensors of one shape, as a double-double pair ``(hi, lo)``."""

    def __init__(self, hi: Tensor | None = None, lo: Tensor | None = None):
        self.hi, self.lo = hi, lo

    def add(self, term: Tensor) -> None:
        term = term.to(torch.float64)
        if self.hi is None:
            self.hi, self.lo = term.clone(), torch.zeros_like(term)
            return
        self.hi, err = two_sum(self.hi, term)
        self.lo += err

    def merge(self, other: Compensated) -> None:
        """Adds another pair (another shard's sum)."""
        if other.hi is None:
            return
        if self.hi is None:  # takes the other's tensors (no copy)
            self.hi, self.lo = other.hi, other.lo
            return
        self.hi, err = two_sum(self.hi, other.hi)
        self.lo += other.lo + err

    def value(self) -> Tensor:
        """The sum, rounded to float64 once."""
        return self.hi + self.lo


def pack_symmetric(matrix: Tensor) -> Tensor:
    """``[n, n]`` symmetric -> its upper triangle ``[n(n+1)/2]`` (row-major)."""
    n = matrix.shape[-1]
    rows, cols = torch.triu_indices(n, n, device=matrix.device)
    return matrix[rows, cols]


def unpack_symmetric(packed: Tensor, n: int) -> Tensor:
    """The inverse of :func:`pack_symmetric`: ``[n, n]``."""
    rows, cols = torch.triu_indices(n, n, device=packed.device)
    out = torch.zeros(n, n, dtype=packed.dtype, device=packed.device)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


@dataclass(frozen=True)
class FitPass:
    """One pass of a fit over the training set whose result is a sum over blocks.

    Attributes:
        name: the pass (``covariance``, ``eigenvalues``).
        key: a hash of everything that determines its partial sums (cache identity).
        n_blocks: how many blocks of examples the training set is split into.
        compute: ``blocks -> payload`` of tensors: the partial sums over those blocks, with
            ``values [len(blocks)]`` (each block's example count).
        finish: ``payloads of a complete split -> None``: combines the partial sums (in any
            order: :mod:`estimators.accumulate`) into the estimator's state.
    """

    name: str
    key: str
    n_blocks: int
    compute: Callable[[list[int]], dict[str, Tensor]]
    finish: Callable[[list[dict[str, Tensor]]], None]
