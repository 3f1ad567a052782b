"""Layer-wise scoring of a gradient estimator within a memory budget.

:func:`plan` sizes the work against the budget (:mod:`estimators.memory`): it probes the
activations one example keeps, decides per layer how the preconditioned queries are stored
(``dense`` when every layer's ``[Q, o, i]`` fits in half of what the fixed parts leave, else
``factors`` wherever they are smaller, and rank-r factors under ``query_rank``), and takes
the largest training chunk and query chunk that fit. :func:`query_store` builds the store one
query chunk at a time, :func:`scores` streams the training set chunk by chunk, one layer at
a time (:mod:`estimators.layerwise`), and :func:`self_influence` does the same for
∇Lᵀ P ∇L. Per-example gradients of all layers never exist at once; memory does not grow
with n_train beyond the ``[n_queries, n_train]`` score matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from estimators import layerwise
from estimators.gradients import GradientEngine, score_dtype
from estimators.layerwise import LayerPreconditioner, LayerQueries
from estimators.memory import BACKWARD_FACTOR, Budget, SavedBytes, mb, parameter_bytes, release
from estimators.problem import AttributionProblem, eval_mode, move_to

FINITE_HINT = ("check the inputs, lower the training learning rate, or train in float64 (the "
               "model's loss or measurement overflowed)")


@dataclass
class ScorePlan:
    """Sizes of one scoring run (bytes unless said otherwise)."""

    chunk_size: int
    query_chunk: int
    forms: dict[str, str]  # layer -> dense | factors | low_rank
    expand_bytes: float
    fixed: dict[str, float] = field(default_factory=dict)
    per_example: float = 0.0


def probe(problem: AttributionProblem, engine: GradientEngine, which: str,
          size: int = 2) -> tuple[float, int]:
    """``(bytes autograd keeps per example, tokens T)`` from one batch of up to ``size``
    examples (the extra parameters of ``all_parameters`` are counted by the plan instead)."""
    fn = problem.train_loss if which == "train" else problem.query_measure
    batch = move_to(next(iter(problem.loader(which, size))), problem.device)
    extras, engine.extras = engine.extras, None
    try:
        with eval_mode(problem.model), SavedBytes(problem.model) as saved:
            captured = engine.capture(fn, batch)
    finally:
        engine.extras = extras
    a = next(iter(captured.values()))[0]
    return saved.total / a.shape[0], int(a.shape[1])


def capture_bytes(engine: GradientEngine, tokens: int, elem: int) -> float:
    """A captured example's factors: T·Σ(o + i) numbers (the input with its 1, the gradient)."""
    return float(tokens * sum(o + i for o, i in (layer.shape for layer in engine.layers)) * elem)


def plan(estimator, problem: AttributionProblem, engine: GradientEngine, budget: Budget,
         state_bytes: float = 0.0) -> ScorePlan:
    """The chunk sizes and query forms of ``estimator`` on ``problem`` within ``budget``."""
    elem = torch.empty((), dtype=score_dtype(problem.model)).element_size()
    n_q, n_train = problem.n_queries, problem.n_train
    shapes = {layer.name: layer.shape for layer in engine.layers}
    size = min(2, estimator.chunk_size)
    act_train, t_train = probe(problem, engine, "train", size)
    act_query, t_query = probe(problem, engine, "queries", size)
    rank = getattr(estimator, "query_rank", None)
    n_layers = len(shapes) if estimator.per_layer else 1
    fixed = {"model": parameter_bytes(problem.model), "factors": state_bytes,
             "scores": float(n_q * n_train * 4 * n_layers)}
    left = budget.total - sum(fixed.values())
    dense = {n: n_q * o * i * elem for n, (o, i) in shapes.items()}
    low = {n: n_q * rank * (o + i) * elem for n, (o, i) in shapes.items()
           if rank is not None and rank < min(o, i)}  # full-rank layers stay exact
    all_dense = sum(dense[n] for n in shapes if n not in low) + sum(low.values()) <= left / 2
    forms, store = {}, {}
    for name, (o, i) in shapes.items():
        if name in low:
            forms[name], store[name] = "low_rank", low[name]
        elif all_dense:
            forms[name], store[name] = "dense", dense[name]
        elif t_query * (o + i) < o * i:
            forms[name], store[name] = "factors", n_q * t_query * (o + i) * elem
        else:
            forms[name], store[name] = "dense", dense[name]
    extra = engine.extras.numel * elem if engine.extras is not None else 0
    fixed["query gradients"] = float(sum(store.values()) + n_q * extra)
    largest = max(o * i for o, i in shapes.values())
    expand = 0.0
    if any(f != "dense" for f in forms.values()):
        expand = min(n_q * largest * elem, max(largest * elem, 0.1 * budget.total))
    fixed["query expansion"] = expand
    ks = [rank if forms[n] == "low_rank" else t_query for n in shapes if forms[n] != "dense"]
    factored = t_train * n_q * max(ks, default=0) * elem * 2
    per_example = (act_train * BACKWARD_FACTOR + capture_bytes(engine, t_train, elem) * 2
                   + largest * elem * 2 + factored + extra * 2)
    hint = _hint(estimator)
    name = type(estimator).__name__.lower()
    chunk = budget.batch(fixed, per_example, estimator.chunk_size, f"{name}'s scoring",
                         "estimator.chunk_size", hint)
    per_query = (act_query * BACKWARD_FACTOR + capture_bytes(engine, t_query, elem) * 2
                 + largest * elem * (4 if "low_rank" in forms.values() else 2) + extra * 2)
    build = {k: v for k, v in fixed.items() if k != "query expansion"}
    query_chunk = budget.batch(build, per_query, estimator.chunk_size,
                               f"{name}'s query gradients", "estimator.chunk_size", hint)
    return ScorePlan(chunk, query_chunk, forms, max(expand, largest * elem), fixed, per_example)


def _hint(estimator) -> str:
    parts = ["raise memory_budget_mb"]
    if hasattr(estimator, "query_rank") and estimator.query_rank is None:
        parts.insert(0, "set estimator.query_rank (e.g. 32)")
    parts.append("attribute through fewer layers (estimator.modules), or score fewer queries "
                 "per run")
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def _finite(name: str, *tensors: Tensor) -> Tensor:
    """Raises if any of ``tensors`` holds a NaN or inf; returns the first. Checking a layer's
    scores (or self-influence) stands for checking its factors: a non-finite input always
    makes its products non-finite (inf · 0 is NaN), and it costs far less."""
    if not all(torch.isfinite(t).all() for t in tensors):
        raise FloatingPointError(f"Non-finite gradient in layer '{name}': {FINITE_HINT}.")
    return tensors[0]


def query_store(estimator, problem: AttributionProblem, engine: GradientEngine,
                pres: dict[str, LayerPreconditioner], sizes: ScorePlan,
                budget: Budget) -> dict[str, LayerQueries]:
    """Every layer's preconditioned query gradients, built one query chunk at a time.

    Layers whose stored shape does not depend on the query (``dense``, ``low_rank``, the
    extra parameters) are written into one tensor per layer allocated at the first chunk;
    ``factors`` (k = the query's tokens) are joined at the end, one layer at a time. What
    the chunks' transients leave in the heap is handed back at the end (:func:`release`)."""
    dtype = score_dtype(problem.model)
    low_rank = estimator.low_rank if getattr(estimator, "query_rank", None) else None
    allowed = budget.total - sum(v for k, v in sizes.fixed.items() if k != "query gradients")
    n_q = problem.n_queries
    store: dict[str, LayerQueries] = {}
    chunks: dict[str, list[LayerQueries]] = {}
    held, start, size = 0, 0, 0

    def keep(name: str, part: LayerQueries, fixed_shape: bool) -> None:
        nonlocal size
        size = part.n_queries
        if not fixed_shape:
            chunks.setdefault(name, []).append(part)
            return
        if name not in store:
            store[name] = part.allocate(n_q)
        store[name].write(slice(start, start + part.n_queries), part)

    with eval_mode(problem.model):
        for batch in problem.loader("queries", sizes.query_chunk):
            captured = engine.capture(problem.query_measure, move_to(batch, problem.device))
            for name, (a, g) in captured.items():
                _finite(name, a, g)
                form = sizes.forms[name]
                part = layerwise.store_chunk(pres[name], a, g, dtype, form,
                                             low_rank if form == "low_rank" else None)
                held += part.nbytes
                if held > allowed:
                    raise ValueError(
                        f"{type(estimator).__name__.lower()}'s query gradients outgrew "
                        f"{budget.source} ({mb(budget.total)}) at {mb(held)} (the "
                        f"queries are longer than the first ones): {_hint(estimator)}.")
                keep(name, part, form != "factors")
            for name, grads in engine.last_extras.items():  # modules=all_parameters
                keep(name, layerwise.LayerQueries(dense=grads.to(dtype)[:, None, :]), True)
            del captured
            start += size
    if start != n_q:
        raise RuntimeError(f"the query loader gave {start} queries, expected {n_q}")
    for name in list(chunks):  # one layer's chunks and its concatenation at a time
        store[name] = layerwise.concat(chunks.pop(name))
    order = [*engine.names, *(name for name in store if name not in engine.names)]
    store = {name: store[name] for name in order}
    if estimator.unit_norm:
        norms = sum(q.squared_norms() for q in store.values()).sqrt()
        for name in store:
            store[name].normalise(norms)
    release(problem.device)  # the chunks' transients, fragmented in the heap
    return store


def train_factors(problem: AttributionProblem, engine: GradientEngine,
                  chunk_size: int) -> Iterator[tuple[slice, dict[str, tuple[Tensor, Tensor]]]]:
    """``(rows, {layer: (a, g)})`` per chunk of the training set (loss gradients)."""
    start = 0
    with eval_mode(problem.model):
        for batch in problem.loader("train", chunk_size):
            captured = engine.capture(problem.train_loss, move_to(batch, problem.device))
            size = next(iter(captured.values()))[0].shape[0]
            yield slice(start, start + size), captured
            del captured
            start += size


def scores(estimator, problem: AttributionProblem, train: AttributionProblem,
           engine: GradientEngine, store: dict[str, LayerQueries], sizes: ScorePlan) -> Iterator:
    """``(rows, −⟨P∇f, ∇L⟩)`` per training chunk of ``train``: ``[Q, B]`` (``[L, Q, B]`` with
    ``per_layer``), in the score dtype."""
    dtype = score_dtype(problem.model)
    workspace = layerwise.Workspace()
    for rows, captured in train_factors(train, engine, sizes.chunk_size):
        parts, norms = [], 0.0
        for name, (a, g) in captured.items():
            parts.append(_finite(name, layerwise.layer_scores(store[name], a, g, dtype,
                                                              sizes.expand_bytes, workspace)))
            if estimator.unit_norm:
                norms = norms + layerwise.self_terms(layerwise.IDENTITY, a, g, dtype)
        for name, grads in engine.last_extras.items():  # modules=all_parameters
            grads = grads.to(dtype)
            parts.append(store[name].dense.flatten(1) @ grads.T)
            if estimator.unit_norm:
                norms = norms + grads.pow(2).sum(1)
        total = torch.stack(parts) if estimator.per_layer else sum(parts)
        if estimator.unit_norm:
            total = total / torch.as_tensor(norms).clamp_min(1e-24).sqrt()
        yield rows, -total


def self_influence(problem: AttributionProblem, engine: GradientEngine,
                   pres: dict[str, LayerPreconditioner], chunk_size: int,
                   unit_norm: bool = False) -> Tensor:
    """``[n_train]``: ∇L(z_m)ᵀ P ∇L(z_m), one chunk and one layer at a time."""
    dtype = score_dtype(problem.model)
    values = torch.zeros(problem.n_train, dtype=dtype)
    for rows, captured in train_factors(problem, engine, chunk_size):
        if unit_norm:
            values[rows] = 1.0
            continue
        total = 0.0
        for name, (a, g) in captured.items():
            total = total + _finite(name, layerwise.self_terms(pres[name], a, g, dtype))
        for grads in engine.last_extras.values():  # modules=all_parameters
            total = total + grads.to(dtype).pow(2).sum(1)
        values[rows] = total.cpu()
    return values
