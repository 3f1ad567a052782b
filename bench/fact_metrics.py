"""Fact-tracing metrics (Chang et al. 2024): attribution (MRR, recall@k) and influence
(tail-patch) of an estimator's ranking, for tasks whose queries know their proponents.

A task declares this ground truth in ``problem.extra``:

* ``proponents``: per query, the training indices of the documents that state its fact
  (empty: the query is left out of the attribution metrics);
* ``query_sets`` (optional): ``{"forward": [...], "flipped": [...]}`` query indices; metrics
  of the ``flipped`` set get the prefix ``flipped_``;
* ``tail_patch`` (optional): ``{lr, adam, step_loss}`` (see below); ``adam`` is the final
  optimizer state ``{step, betas, eps, exp_avg_sq: {parameter name: v}}`` or None.

Metrics, each a mean over the queries of a set:

* ``mrr``: 1 / rank of the best-ranked proponent; ``recall@k``: the fraction of the
  proponents in the top k. Ranks follow descending score, ties by training index; NaN
  scores (no score, e.g. outside a candidate filter) rank last.
* ``proponent_share``: Σ_{p ∈ proponents} score(q, p) / Σ_m |score(q, m)|.
* ``tail_patch``: for each of the top-k documents, the increase of the query's measurement
  (log p(target)) after one Adam step on that document alone from the final checkpoint, as
  ``torch.optim.Adam.step`` takes it from the final optimizer state with the first moment
  zeroed (so the step depends only on the document): with g = ∇ℓ_d (ℓ_d the document's step
  loss, its mean token NLL) and t the final step count,
  m = (1 − β₁) g,  v = β₂ v_final + (1 − β₂) g²,
  Δθ = −lr · (m / (1 − β₁^{t+1})) / (√(v / (1 − β₂^{t+1})) + ε);
  a plain gradient step Δθ = −lr g where the task knows no Adam state. Decoupled weight
  decay is not applied. Averaged over the k documents.
* ``tail_patch_random``: the same for k random documents per query (seeded);
  ``tail_patch_gradnorm``: for the k documents with the largest training-loss gradient norm
  (a large step moves any prediction; an estimator should beat mere norm).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from estimators.gradients import GradientEngine, squared_norm
from estimators.problem import AttributionProblem, move_to

log = logging.getLogger(__name__)


def ranking(scores: Tensor) -> Tensor:
    """``[Q, N]`` training indices in descending score order (ties by index, NaN last)."""
    filled = torch.nan_to_num(scores.double(), nan=-torch.inf)
    return torch.sort(filled, dim=1, descending=True, stable=True).indices


def reciprocal_rank_recall(order: Tensor, proponents: list[list[int]],
                           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query reciprocal rank of the best proponent and recall@k ``([Q], [Q])``."""
    rr = np.full(len(proponents), np.nan)
    recall = np.full(len(proponents), np.nan)
    for q, props in enumerate(proponents):
        if not props:
            continue
        position = torch.empty_like(order[q])
        position[order[q]] = torch.arange(order.shape[1])
        ranks = position[torch.as_tensor(props)] + 1
        rr[q] = 1.0 / float(ranks.min())
        recall[q] = float((ranks <= k).double().mean())
    return rr, recall


def proponent_share(scores: Tensor, proponents: list[list[int]]) -> np.ndarray:
    """``[Q]``: Σ over proponents of the score / Σ over all documents of |score|."""
    s = torch.nan_to_num(scores.double(), nan=0.0)
    out = np.full(len(proponents), np.nan)
    for q, props in enumerate(proponents):
        total = float(s[q].abs().sum())
        if props and total > 0:
            out[q] = float(s[q, props].sum()) / total
    return out


def gradient_norms(problem: AttributionProblem, chunk_size: int = 64) -> Tensor:
    """``[N]``: the norm of each training example's loss gradient (tracked layers)."""
    engine = GradientEngine(problem.model)
    norms = torch.zeros(problem.n_train)
    for idx, grads in engine.stream(problem, "train", chunk_size, "gradient norms"):
        norms[idx] = squared_norm(grads).sqrt().cpu().float()
    return norms


class TailPatcher:
    """One Adam step on one training document, and the resulting change of queries' f."""

    def __init__(self, problem: AttributionProblem, spec: dict):
        self.problem, self.model = problem, problem.model
        self.lr, self.step_loss = float(spec["lr"]), spec["step_loss"]
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.adam = spec.get("adam")
        self.model.eval()
        self.base = self.measure(list(range(problem.n_queries)))

    @torch.no_grad()
    def measure(self, queries: list[int]) -> Tensor:
        """``[len(queries)]`` measurements under the current parameters (float64, CPU)."""
        out = []
        for start in range(0, len(queries), 128):
            batch = self.problem.collate_fn([self.problem.queries[i]
                                             for i in queries[start:start + 128]])
            batch = move_to(batch, self.problem.device)
            out.append(self.problem.query_measure(self.model, batch).double().cpu())
        return torch.cat(out)

    def step(self, doc: int) -> dict[str, Tensor]:
        """The parameter update Δθ of one Adam step on document ``doc``."""
        batch = move_to(self.problem.collate_fn([self.problem.train[doc]]), self.problem.device)
        loss = self.step_loss(self.model, batch)
        grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
        update = {}
        for name, g in zip(self.params, grads, strict=True):
            if g is None:
                continue
            if self.adam is None or name not in self.adam["exp_avg_sq"]:
                update[name] = -self.lr * g
                continue
            (beta1, beta2), t = self.adam["betas"], self.adam["step"] + 1
            v = beta2 * self.adam["exp_avg_sq"][name].to(g) + (1 - beta2) * g * g
            m_hat = (1 - beta1) * g / (1 - beta1 ** t)
            update[name] = -self.lr * m_hat / ((v / (1 - beta2 ** t)).sqrt() + self.adam["eps"])
        return update

    def effects(self, doc: int, queries: list[int]) -> Tensor:
        """``[len(queries)]``: f after the step on ``doc`` minus f before."""
        update = self.step(doc)
        saved = {n: self.params[n].detach().clone() for n in update}
        with torch.no_grad():
            for n, delta in update.items():
                self.params[n].add_(delta)
        try:
            return self.measure(queries) - self.base[queries]
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    self.params[n].copy_(value)


def tail_patch(patcher: TailPatcher, selections: dict[str, Tensor],
               queries: list[int]) -> dict[str, np.ndarray]:
    """Mean tail-patch effect per query for each selection ``{name: [Q, k] doc indices}``.

    Each needed (document, query) pair is evaluated once: documents are stepped one at a
    time and only the queries that selected them are measured.
    """
    wanted: dict[int, set[int]] = defaultdict(set)
    for docs in selections.values():
        for q in queries:
            for d in docs[q].tolist():
                wanted[d].add(q)
    effect: dict[tuple[int, int], float] = {}
    for d in sorted(wanted):
        qs = sorted(wanted[d])
        for q, value in zip(qs, patcher.effects(d, qs).tolist(), strict=True):
            effect[(d, q)] = value
    n = patcher.problem.n_queries
    out = {}
    for name, docs in selections.items():
        values = np.full(n, np.nan)
        for q in queries:
            values[q] = float(np.mean([effect[(d, q)] for d in docs[q].tolist()]))
        out[name] = values
    return out


def fact_tracing(problem: AttributionProblem, scores: Tensor, k: int = 10, seed: int = 0,
                 tail_patch_k: int | None = None,
                 with_tail_patch: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """All fact-tracing metrics of ``scores`` ``[Q, N]`` (see module docstring).

    Args:
        k: the cut-off of recall@k (and of tail-patch unless ``tail_patch_k``).
        seed: the generator of the random tail-patch baseline.
        tail_patch_k: documents per query for tail-patch (None: ``k``).
        with_tail_patch: compute tail-patch metrics (needs ``problem.extra["tail_patch"]``
            with a learning rate).

    Returns:
        ``(metrics, per_query)``: means under their record keys, and ``[Q]`` arrays.
    """
    if k <= 0:
        raise ValueError(f"fact_metrics.k must be positive, got {k}")
    proponents = [list(map(int, p or [])) for p in problem.extra["proponents"]]
    sets = problem.extra.get("query_sets") or {"forward": list(range(problem.n_queries))}
    order = ranking(scores)
    rr, recall = reciprocal_rank_recall(order, proponents, k)
    per_query: dict[str, np.ndarray] = {
        "query_set": np.array([next((s for s, idx in sets.items() if q in idx), "")
                               for q in range(problem.n_queries)]),
        "rr": rr, f"recall@{k}": recall, "proponent_share": proponent_share(scores, proponents),
    }
    spec = problem.extra.get("tail_patch") or {}
    if with_tail_patch and spec.get("lr") is not None:
        kt = int(tail_patch_k or k)
        gen = torch.Generator().manual_seed(seed)
        n = problem.n_train
        selections = {
            "tail_patch": order[:, :kt],
            "tail_patch_random": torch.stack([torch.randperm(n, generator=gen)[:kt]
                                              for _ in range(problem.n_queries)]),
            "tail_patch_gradnorm": gradient_norms(problem).topk(min(kt, n)).indices[None]
            .expand(problem.n_queries, -1),
        }
        queries = sorted(q for idx in sets.values() for q in idx)
        per_query.update(tail_patch(TailPatcher(problem, spec), selections, queries))
    elif with_tail_patch:
        log.info("No tail-patch learning rate for this task: tail-patch metrics skipped.")
    metrics: dict[str, float] = {}
    for name, idx in sets.items():
        prefix = "" if name == "forward" else f"{name}_"
        for key, values in per_query.items():
            if key == "query_set" or not len(idx):
                continue
            chosen = values[idx]
            finite = chosen[np.isfinite(chosen)]
            key = "mrr" if key == "rr" else key
            metrics[prefix + key] = float(finite.mean()) if finite.size else float("nan")
    return metrics, per_query
