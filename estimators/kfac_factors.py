"""K-FAC's and EK-FAC's passes over the training set, as sums over blocks of examples.

Block j holds the training examples [j·b, (j+1)·b) (b: the fit's batch size after the memory
plan). Each pass's statistic is a sum of per-block terms, added as double-double pairs
(:mod:`estimators.accumulate`), so shards of blocks computed as separate jobs and merged
give the same bits as one job (``stage=factors``):

* **covariance** (Grosse et al. 2023, eq. 18): per layer A = Σ ā āᵀ over the tokens that
  carry gradient (non-zero output gradient: padding and positions that reach no loss are
  left out, so A does not depend on how a block is padded), S = Σ g gᵀ over every token,
  and the token count. A block's terms are one GEMM each in the gradient dtype (bf16
  factors in float32), stored as upper triangles.
* **eigenvalues** (EK-FAC, George et al. 2018; Grosse et al. eq. 20): per layer
  Σₙ (Q_Sᵀ Gₙ Q_A)², from the rotated factors: Q_Sᵀ Gₙ Q_A = Σₜ (Q_Sᵀ gₜ)(Q_Aᵀ āₜ)ᵀ costs
  T·(o² + i²) + T·o·i multiply-adds per example instead of rotating a formed Gₙ's
  o·i·(o + i); one layer's ``[b, o, i]`` exists at a time.

True-Fisher targets are drawn per example, from a generator seeded by the fit's seed and the
example's index (and the pass, for EK-FAC's ``refit_targets: fresh``), so the draws do not
depend on the blocks either. By default both passes use the same draws (Λ is re-fitted on
the per-example gradients whose covariances gave the eigenbasis), so the eigenvalue pass
takes the covariance pass's captured factors from memory where they fit the memory budget
(:class:`Kept`) and recomputes the rest, to the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from estimators.accumulate import Compensated, pack_symmetric, unpack_symmetric
from estimators.gradients import GradientEngine
from estimators.layerwise import Workspace, outer
from estimators.options import OptionError
from estimators.problem import AttributionProblem, Batch, eval_mode, move_to

FISHERS = ("true", "empirical")
LossFn = Callable[[nn.Module, Batch, int], Tensor]  # (model, batch, index of its first example)


def select(batch: Batch, index: int) -> Batch:
    """Example ``index`` of a (nested) batch, keeping the batch dimension."""
    if isinstance(batch, Tensor):
        return batch[index:index + 1]
    if isinstance(batch, dict):
        return {k: select(v, index) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(select(v, index) for v in batch)
    return batch


def concat(batches: list[Batch]) -> Batch:
    """The inverse of :func:`select` over a list of one-example batches."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: concat([b[k] for b in batches]) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(concat(list(parts)) for parts in zip(*batches, strict=True))
    return first


def example_generator(seed: int, pass_id: int, index: int) -> torch.Generator:
    """The generator of one example's sampled targets in one pass."""
    return torch.Generator().manual_seed((seed * 2_654_435_761 + pass_id * 97 + index * 40_503)
                                         % (2**63 - 1))


def fisher_loss(problem: AttributionProblem, fisher: str, seed: int, pass_id: int) -> LossFn:
    """The per-example loss ``[B]`` whose gradients sample the Fisher.

    ``true``: each example's targets drawn from the model's predictive distribution
    (:func:`example_generator`); ``empirical``: the data labels (the training loss itself).
    """
    if fisher == "empirical":
        return lambda model, batch, start: problem.train_loss(model, batch)
    if problem.sample_targets is None:
        raise OptionError("This task defines no sample_targets, so the true Fisher cannot be "
                          "sampled; use {fisher=empirical}.")

    def sampled_loss(model: nn.Module, batch: Batch, start: int) -> Tensor:
        outputs = problem.outputs(model, batch)
        n = outputs.shape[0]
        drawn = [problem.sample_targets(outputs[b:b + 1], select(batch, b),
                                        example_generator(seed, pass_id, start + b))
                 for b in range(n)]
        return problem.loss(outputs, concat(drawn))

    return sampled_loss


def n_blocks(problem: AttributionProblem, block: int) -> int:
    return -(-problem.n_train // block)


def block_batch(problem: AttributionProblem, j: int, block: int) -> tuple[Batch, int]:
    """``(batch on the problem's device, index of its first example)`` of block ``j``."""
    start = j * block
    indices = range(start, min(start + block, problem.n_train))
    loader = DataLoader(Subset(problem.train, indices), batch_size=len(indices),
                        collate_fn=problem.collate_fn)
    return move_to(next(iter(loader)), problem.device), start


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) \
        else torch.float32


def _finite(name: str, *tensors: Tensor) -> Tensor:
    """Raises if any of ``tensors`` is non-finite; returns the first. The passes check a
    layer's block statistics rather than its factors: a NaN or inf in a or g always reaches
    them (inf · 0 is NaN), at a fraction of the cost."""
    if not all(torch.isfinite(t).all() for t in tensors):
        raise FloatingPointError(
            f"Non-finite activations or gradients in layer '{name}' while fitting K-FAC "
            "factors: check the model and inputs, or train in float64.")
    return tensors[0]


def covariance_pass(problem: AttributionProblem, engine: GradientEngine, loss_fn: LossFn,
                    block: int, blocks: list[int], keep: Kept | None = None) -> dict[str, Tensor]:
    """The covariance sums of ``blocks``: ``{values [U], "<layer>|A|hi", ...}`` (A and S as
    packed upper triangles, double-double; token counts). ``keep``: the blocks' captured
    factors are kept there for the eigenvalue pass, while they fit."""
    dtype = accumulation_dtype(problem.model)
    sums: dict[str, Compensated] = {}
    tokens: dict[str, int] = {}
    counts = []
    for name, a, g in _captured_blocks(problem, engine, loss_fn, block, blocks, counts,
                                       keep=keep):
        a, g = a.to(dtype), g.to(dtype)
        carries = (g != 0).any(-1)  # [B, T]: tokens with gradient
        a_used = a[carries]
        tokens[name] = tokens.get(name, 0) + int(a_used.shape[0])
        g_used = g[carries]  # the other tokens' g is 0: they add nothing to S
        cov_a, cov_s = a_used.T @ a_used, g_used.T @ g_used
        _finite(name, cov_a, cov_s)
        sums.setdefault(f"{name}|A", Compensated()).add(pack_symmetric(cov_a))
        sums.setdefault(f"{name}|S", Compensated()).add(pack_symmetric(cov_s))
    payload = _payload(counts, sums)
    for name, n in tokens.items():
        payload[f"{name}|tokens"] = torch.tensor(n, dtype=torch.int64)
    return payload


class Kept:
    """Captured factors of the covariance pass's blocks, kept in memory up to ``limit`` bytes
    so that the eigenvalue pass (the same per-example gradients: the same sampled targets)
    need not recompute them; blocks beyond the limit are recomputed, with the same bits."""

    def __init__(self, limit: float):
        self.limit, self.used, self.full = float(limit), 0.0, False
        self.blocks: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}

    def offer(self, j: int, captured: dict[str, tuple[Tensor, Tensor]]) -> None:
        size = sum(t.numel() * t.element_size() for pair in captured.values() for t in pair)
        if self.full or self.used + size > self.limit:
            self.full = True  # keep a prefix of blocks, never a patchwork
            return
        self.blocks[j], self.used = captured, self.used + size

    def take(self, j: int) -> dict[str, tuple[Tensor, Tensor]] | None:
        return self.blocks.pop(j, None)


def _captured_blocks(problem: AttributionProblem, engine: GradientEngine, loss_fn: LossFn,
                     block: int, blocks: list[int], counts: list[int],
                     keep: Kept | None = None, reuse: Kept | None = None) -> Iterator:
    """``(layer, a [B, T, i], g [B, T, o])`` of every block in ``blocks``, the model in eval
    mode (taken from ``reuse`` where it holds the block, offered to ``keep``); each block's
    example count is appended to ``counts``."""
    with eval_mode(problem.model):
        for j in blocks:
            captured = reuse.take(j) if reuse is not None else None
            if captured is None:
                batch, start = block_batch(problem, j, block)
                captured = engine.capture(lambda m, b, s=start: loss_fn(m, b, s), batch)
            if keep is not None:
                keep.offer(j, captured)
            counts.append(next(iter(captured.values()))[0].shape[0])
            for name, (a, g) in captured.items():  # checked finite by the passes' sums
                yield name, a, g
            del captured


def _payload(counts: list[int], sums: dict[str, Compensated]) -> dict[str, Tensor]:
    payload = {"values": torch.tensor(counts, dtype=torch.float64)}
    for key, acc in sums.items():
        payload[f"{key}|hi"], payload[f"{key}|lo"] = acc.hi, acc.lo
    return payload


def _merged(payloads: list[dict[str, Tensor]], key: str) -> Tensor:
    """The float64 sum of one statistic over a split's payloads; its partial sums are
    dropped from the payloads as they are added (so memory falls as results are built)."""
    total = Compensated()
    for p in payloads:  # a shard of no blocks has no sums
        if f"{key}|hi" in p:
            total.merge(Compensated(p.pop(f"{key}|hi"), p.pop(f"{key}|lo")))
    return total.value()


def covariance(payloads: list[dict[str, Tensor]], name: str, shape: tuple[int, int],
               which: str, n_train: int) -> Tensor:
    """One layer's K-FAC factor in float64 from a complete split's covariance payloads:
    ``A [i, i]`` averaged over the tokens that carry gradient, or ``S [o, o]`` over examples
    (its partial sums are dropped from the payloads)."""
    o, i = shape
    if which == "A":
        n_tok = sum(int(p.get(f"{name}|tokens", 0)) for p in payloads)
        return unpack_symmetric(_merged(payloads, f"{name}|A"), i) / max(n_tok, 1)
    return unpack_symmetric(_merged(payloads, f"{name}|S"), o) / n_train


def eigenbasis(payloads: list[dict[str, Tensor]], engine: GradientEngine, n_train: int,
               dtype: torch.dtype) -> dict[str, dict[str, Tensor]]:
    """From a complete split's covariance payloads, one layer at a time: A (averaged over
    the tokens that carry gradient) and S (over examples) in float64, eigendecomposed, stored
    in ``dtype``; ``lam`` holds K-FAC's Λᵢⱼ = sᵢ aⱼ ``[o, i]``."""
    out = {}
    for layer in engine.layers:
        eig_a, q_a = torch.linalg.eigh(covariance(payloads, layer.name, layer.shape, "A", n_train))
        eig_s, q_s = torch.linalg.eigh(covariance(payloads, layer.name, layer.shape, "S", n_train))
        lam = eig_s.clamp(min=0)[:, None] * eig_a.clamp(min=0)[None, :]
        out[layer.name] = {"q_a": q_a.to(dtype), "q_s": q_s.to(dtype), "lam": lam.to(dtype)}
    return out


def finish_bytes(engine: GradientEngine) -> float:
    """Transient bytes of one layer's eigendecomposition (float64 matrix, vectors, work)."""
    return 8.0 * 3 * max(max(o, i) ** 2 for o, i in (layer.shape for layer in engine.layers))


def eigenvalue_pass(problem: AttributionProblem, engine: GradientEngine, loss_fn: LossFn,
                    basis: dict[str, dict[str, Tensor]], block: int, blocks: list[int],
                    reuse: Kept | None = None) -> dict[str, Tensor]:
    """The sums Σₙ (Q_Sᵀ Gₙ Q_A)² of ``blocks``: ``{values [U], "<layer>|hi", "|lo"}``
    (blocks the covariance pass kept in ``reuse`` are not recomputed)."""
    dtype = accumulation_dtype(problem.model)
    sums: dict[str, Compensated] = {}
    counts = []
    workspace = Workspace()
    for name, a, g in _captured_blocks(problem, engine, loss_fn, block, blocks, counts,
                                       reuse=reuse):
        q_a = basis[name]["q_a"].to(device=a.device, dtype=dtype)
        q_s = basis[name]["q_s"].to(device=a.device, dtype=dtype)
        rotated = outer(a.to(dtype) @ q_a, g.to(dtype) @ q_s, workspace)  # [b, o, i]
        sums.setdefault(name, Compensated()).add(_finite(name, rotated.pow_(2).sum(0)))
    return _payload(counts, sums)


def eigenvalues(payloads: list[dict[str, Tensor]], engine: GradientEngine, n_train: int,
                dtype: torch.dtype) -> dict[str, Tensor]:
    """``{layer: Λ [o, i]}`` = (1/N) Σₙ (Q_Sᵀ Gₙ Q_A)², stored in ``dtype``."""
    return {layer.name: (_merged(payloads, layer.name) / n_train).to(dtype)
            for layer in engine.layers}


def accumulator_bytes(engine: GradientEngine, which: str) -> float:
    """Bytes of a pass's double-double sums (two float64 per number)."""
    total = 0
    for o, i in (layer.shape for layer in engine.layers):
        total += i * (i + 1) // 2 + o * (o + 1) // 2 if which == "covariance" else o * i
    return 16.0 * total
