"""``tail_patch``: the influence side of fact tracing (Chang et al. 2024, §4.2).

For each query and each of the top-k documents of the estimator's ranking, the increase of
the query's measurement (log p(target)) after one training step on that document alone from
the final checkpoint, averaged over the k documents. The step is ``torch.optim.Adam.step``
taken from the final optimizer state with the first moment zeroed (so the step depends only
on the document): with g = ∇ℓ_d (ℓ_d the document's step loss, its mean token NLL) and t the
final step count,

    m = (1 − β₁) g,  v = β₂ v_final + (1 − β₂) g²,
    Δθ = −lr · (m / (1 − β₁^{t+1})) / (√(v / (1 − β₂^{t+1})) + ε);

a plain gradient step Δθ = −lr g where the task knows no Adam state. Decoupled weight decay
is not applied. Baselines: k random documents per query (seeded, ``tail_patch_random``) and
the k documents with the largest training-loss gradient norm (``tail_patch_gradnorm``: a
large step moves any prediction; an estimator should beat mere norm).

A ``run`` kind that needs the scores, configured by ``fact_metrics:`` (``k``,
``tail_patch_k``, ``seed``, ``with_tail_patch``), active where the problem has a
``tail_patch`` capability (:class:`~estimators.problem.TailPatch`). The metrics
``tail_patch``, ``tail_patch_random`` and ``tail_patch_gradnorm`` read it
(:mod:`bench.metrics.fact_tracing`).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from bench.metrics.fact_tracing import ranking
from bench.truths.base import TruthContext, register_truth
from bench.truths.proponents import FactTracing
from estimators.gradients import GradientEngine, squared_norm
from estimators.problem import AttributionProblem, TailPatch, eval_mode, move_to

log = logging.getLogger(__name__)


def gradient_norms(problem: AttributionProblem, chunk_size: int = 64) -> Tensor:
    """``[N]``: the norm of each training example's loss gradient (tracked layers)."""
    engine = GradientEngine(problem.model)
    norms = torch.zeros(problem.n_train)
    for idx, grads in engine.stream(problem, "train", chunk_size, "gradient norms"):
        norms[idx] = squared_norm(grads).sqrt().cpu().float()
    return norms


class TailPatcher:
    """One Adam step on one training document, and the resulting change of queries' f."""

    def __init__(self, problem: AttributionProblem, spec: TailPatch):
        self.problem, self.model = problem, problem.model
        self.lr, self.step_loss, self.adam = float(spec.lr), spec.step_loss, spec.adam
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.base = self.measure(list(range(problem.n_queries)))

    def measure(self, queries: list[int]) -> Tensor:
        """``[len(queries)]`` measurements under the current parameters (float64, CPU)."""
        out = []
        with torch.no_grad(), eval_mode(self.model):
            for start in range(0, len(queries), 128):
                batch = self.problem.collate_fn([self.problem.queries[i]
                                                 for i in queries[start:start + 128]])
                batch = move_to(batch, self.problem.device)
                out.append(self.problem.query_measure(self.model, batch).double().cpu())
        return torch.cat(out)

    def step(self, doc: int) -> dict[str, Tensor]:
        """The parameter update Δθ of one Adam step on document ``doc``."""
        batch = move_to(self.problem.collate_fn([self.problem.train[doc]]), self.problem.device)
        with eval_mode(self.model):
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


@register_truth
class TailPatchTest(FactTracing):
    """One training step per top-ranked document (see module docstring)."""

    name = "tail_patch"
    needs = "scores"

    def active(self, ctx: TruthContext) -> bool:
        if not self.spec["with_tail_patch"]:
            return False
        if ctx.problem.tail_patch is None:
            if ctx.problem.proponents is not None:
                log.info("No tail-patch learning rate for this task: tail-patch metrics "
                         "skipped.")
            return False
        return True

    def load(self, ctx: TruthContext) -> dict[str, np.ndarray]:
        """``{tail_patch, tail_patch_random, tail_patch_gradnorm}``: ``[Q]`` each."""
        problem, scores = ctx.problem, ctx.scores
        kt = int(self.spec["tail_patch_k"] or self.spec["k"])
        gen = torch.Generator().manual_seed(int(self.spec["seed"]))
        n = problem.n_train
        selections = {
            "tail_patch": ranking(scores)[:, :kt],
            "tail_patch_random": torch.stack([torch.randperm(n, generator=gen)[:kt]
                                              for _ in range(problem.n_queries)]),
            "tail_patch_gradnorm": gradient_norms(problem).topk(min(kt, n)).indices[None]
            .expand(problem.n_queries, -1),
        }
        groups = problem.query_groups or {"forward": list(range(problem.n_queries))}
        queries = sorted(q for idx in groups.values() for q in idx)
        return tail_patch(TailPatcher(problem, problem.tail_patch), selections, queries)
