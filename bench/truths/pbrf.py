"""Ground truth by the proximal Bregman response function (PBRF; Bae et al. 2022, Grosse et
al. 2023 §2.2), the target that influence functions approximate for networks that are not
trained to convergence.

For each of ``n`` training examples z_m (drawn by a seeded generator) the response

    θ* = argmin_θ (1/N) Σᵢ D_ℓ(h(θ, xᵢ), h(θˢ, xᵢ)) + ε L(z_m, θ) + ((λ₂ + λ)/2) ‖θ − θˢ‖²

is solved from the attributed model θˢ (D_ℓ the Bregman divergence of the loss in output
space: ℓ(h) − ℓ(hˢ) − ∇ℓ(hˢ)ᵀ(h − hˢ); the task's L2 term (λ₂/2)‖θ‖² is its own Bregman
divergence, (λ₂/2)‖θ − θˢ‖², so it joins the proximity term λ), and the PBRF value of each
query is (f(z_q; θ*) − f(z_q; θˢ)) / ε. To first order in ε it equals the score of DESIGN.md
with the Gauss-Newton curvature, −∇fᵀ(G + λ₂I + λI)⁻¹∇L, so ``explicit`` (ggn, damping λ) is
its exact linearisation.

The optimisation is over δ = (θ − θˢ)/ε (the objective divided by ε², which is O(1) as
ε → 0), in float64 by L-BFGS from δ = 0, over the parameters of every linear layer. Each
shard records ``solves`` ``[units, 2]``: L-BFGS iterations and the final max |∇δ| (on ReLU
networks the objective is only piecewise smooth, and a solve can stop at a kink with a small
non-zero gradient, e.g. 4e-3 after 467 iterations on one digits_mlp example).

Unlike LOO and LDS the PBRF depends on θˢ, so on the run's ``seed`` (``needs = "model"``):
its cache key holds a digest of the attributed model's parameters. Units are the chosen
training examples; shards take units ``s, s+S, ...`` (:mod:`bench.ground_truth`). The metrics
``pbrf_pearson`` and ``pbrf_spearman`` read it (:mod:`bench.metrics.correlation`).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from bench import ground_truth as driver
from bench.truths.base import GroundTruth, TruthContext, register_truth
from estimators.explicit import functional_outputs
from estimators.gradients import GradientEngine
from estimators.options import bounded, natural, positive
from estimators.problem import AttributionProblem, Batch, move_to

DEFAULTS = {
    "n": 50,                 # training examples whose response is solved
    "seed": 0,               # the generator that draws them
    "epsilon": 1.0e-3,       # ε, the up-weighting of z_m
    "damping": 1.0e-3,       # λ of the proximity term (match explicit's damping)
    "max_iter": 500,         # L-BFGS iterations
    "tolerance_grad": 1.0e-9,  # L-BFGS stops when the δ-gradient's max entry is below this
    "history_size": 50,
}


def _double(batch: Batch) -> Batch:
    """Floating tensors of a (nested) batch in float64."""
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _double(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_double(v) for v in batch)
    return batch


class Response:
    """The PBRF of one attributed model, in float64.

    Args:
        problem: the attribution problem (its model is copied, never changed).
        spec: the PBRF settings (see :data:`DEFAULTS`).
    """

    def __init__(self, problem: AttributionProblem, spec: dict):
        self.spec = spec
        model = copy.deepcopy(problem.model).double().eval()
        self.problem = dataclasses.replace(problem, model=model)
        engine = GradientEngine(model)
        self.outputs = functional_outputs(self.problem, engine)
        self.theta = engine.parameters().double()
        collate = problem.collate_fn or default_collate
        self.collate = lambda items: _double(move_to(collate(items), problem.device))
        self.train = self.collate([problem.train[i] for i in range(problem.n_train)])
        self.queries = self.collate([problem.queries[i] for i in range(problem.n_queries)])
        with torch.no_grad():
            self.f_s = self.measure(self.theta)
        out = self.outputs(self.theta, self.train).detach().requires_grad_(True)
        loss = problem.loss(out, self.train)
        (self.grad_out,) = torch.autograd.grad(loss.sum(), out)
        self.out_s, self.loss_s = out.detach(), loss.detach()
        self.solves: list[tuple[float, float]] = []  # (L-BFGS iterations, final max |∇δ|)

    def measure(self, theta: Tensor) -> Tensor:
        """``[Q]``: the query measurements at θ."""
        return self.problem.measure(self.outputs(theta, self.queries), self.queries)

    def bregman(self, theta: Tensor) -> Tensor:
        """(1/N) Σᵢ D_ℓ(h(θ, xᵢ), h(θˢ, xᵢ)), a scalar."""
        out = self.outputs(theta, self.train)
        loss = self.problem.loss(out, self.train)
        linear = (self.grad_out * (out - self.out_s)).reshape(len(loss), -1).sum(1)
        return (loss - self.loss_s - linear).sum() / len(loss)

    def value(self, m: int) -> Tensor:
        """``[Q]``: (f(z_q; θ*) − f(z_q; θˢ)) / ε for up-weighting training example ``m``."""
        eps = float(self.spec["epsilon"])
        prox = self.problem.l2 + float(self.spec["damping"])
        z = self.collate([self.problem.train[m]])
        with torch.no_grad():
            loss_m = self.problem.loss(self.outputs(self.theta, z), z).sum()
        delta = torch.zeros_like(self.theta, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [delta], lr=1.0, max_iter=int(self.spec["max_iter"]),
            max_eval=2 * int(self.spec["max_iter"]),
            tolerance_grad=float(self.spec["tolerance_grad"]), tolerance_change=0.0,
            history_size=int(self.spec["history_size"]), line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            theta = self.theta + eps * delta
            up = self.problem.loss(self.outputs(theta, z), z).sum() - loss_m
            objective = self.bregman(theta) / eps**2 + up / eps + 0.5 * prox * delta.pow(2).sum()
            objective.backward()
            return objective

        optimizer.step(closure)
        closure()  # the gradient at the solution, for the convergence record
        self.solves.append((float(optimizer.state[delta]["n_iter"]), float(delta.grad.abs().max())))
        with torch.no_grad():
            return ((self.measure(self.theta + eps * delta) - self.f_s) / eps).cpu()


@register_truth
class PBRF(GroundTruth):
    """Proximal Bregman responses of the attributed model (see module docstring).

    Settings (``task.pbrf``): see :data:`DEFAULTS`.
    """

    name = "pbrf"
    needs = "model"
    defaults = DEFAULTS
    format = 2  # 2: max_eval = 2 max_iter, solves recorded

    def validate(self) -> None:
        for key in ("n", "max_iter", "history_size"):
            positive(key, self.spec[key], integer=True)
        for key in ("epsilon", "tolerance_grad"):
            positive(key, self.spec[key])
        bounded("damping", self.spec["damping"], 0.0)
        natural("seed", self.spec["seed"])

    def plan(self, ctx: TruthContext) -> driver.Plan:
        gen = torch.Generator().manual_seed(int(self.spec["seed"]))
        indices = torch.randperm(ctx.task.n_train, generator=gen)[: int(self.spec["n"])]
        return self.make_plan(ctx, list(range(len(indices))), {"indices": indices},
                              model=ctx.problem.model)

    def compute(self, ctx: TruthContext, plan: driver.Plan, units: list[int],
                desc: str) -> dict[str, Tensor]:
        """One proximal response per unit; the payload also records each solve's L-BFGS
        iterations and final gradient (``solves [U, 2]``)."""
        response = Response(ctx.problem, plan.spec)
        values = [response.value(int(plan.meta["indices"][u]))
                  for u in tqdm(units, desc=desc, disable=None)]
        return {"values": torch.stack(values) if values else torch.zeros(0),
                "solves": torch.tensor(response.solves, dtype=torch.float64)}

    def assemble(self, ctx: TruthContext, plan: driver.Plan, shards: driver.Shards) -> dict:
        """``indices [L]`` and ``effects [L, Q]`` = (f(θ*) − f(θˢ))/ε."""
        return {"indices": plan.meta["indices"], "effects": shards.values}
