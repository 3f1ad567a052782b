"""dattri (Deng et al. 2024, github.com/TRAIS-Lab/dattri, 0.3.0) behind tda-bench's contract.

dattri's contract is an ``AttributionTask`` of two torch.func functions of
``(params, data)``; both come from the problem, through its own ``outputs``:

* ``loss_func`` = mean_b L(z_b): per example (dattri vmaps it over a batch) the training
  loss L(z_m), on a whole batch the mean training objective whose Hessian the influence
  functions invert (the task's λ₂ is added as dattri's ``regularization``, as it enters
  tda-bench's curvatures);
* ``target_func`` = −mean_b f(z_b): dattri's scores are ∇L(z_m) · T(∇target(z_q)), positive
  when the training example lowers the target (dattri's examples attribute a test loss), so
  with target = −f they are tda-bench's convention, −∇f(z_q)ᵀ P ∇L(z_m) (positive =
  proponent).

``data`` is the problem's collated batch as a flat list of tensors
(:class:`~estimators.peers.common.FlatBatches`); gradients are taken with respect to the
tracked layers' parameters (dattri's ``layer_name``), the θ of tda-bench's estimators. dattri
returns ``[n_train, n_queries]``; the peers return its transpose ``[n_queries, n_train]``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from estimators.base import Estimator
from estimators.options import GradientOptions, positive
from estimators.peers.common import (
    FlatBatches,
    check_per_example_vmap,
    functional_outputs,
    per_example_vmap,
    require,
    tracked_parameter_names,
)
from estimators.problem import AttributionProblem


def dattri_task(problem: AttributionProblem, batches: FlatBatches,
                states: Sequence[dict[str, Tensor]] | None = None, train_fn: str = "loss"):
    """``(task, model)``: a dattri ``AttributionTask`` of the problem, on a copy of its model.

    Args:
        batches: how the problem's batches are flattened for dattri.
        states: the checkpoints' state dicts (default: the attributed model's).
        train_fn: ``loss`` (training loss, the influence functions) or ``measure``
            (−f on training examples too: TRAK's model output).
    """
    task_module = require("dattri.task", "dattri")
    model = copy.deepcopy(problem.model).eval()
    for parameter in model.parameters():  # dattri differentiates the parameters requiring grad
        parameter.requires_grad_(True)
    outputs = functional_outputs(problem, model)

    def loss_func(params: dict[str, Tensor], data: list[Tensor]) -> Tensor:
        batch = batches.rebuild(data)
        return problem.loss(outputs(params, batch), batch).mean()

    def target_func(params: dict[str, Tensor], data: list[Tensor]) -> Tensor:
        batch = batches.rebuild(data)
        return -problem.measure(outputs(params, batch), batch).mean()

    states = list(states) if states else [problem.model.state_dict()]
    task = task_module.AttributionTask(
        loss_func=target_func if train_fn == "measure" else loss_func, model=model,
        checkpoints=states, target_func=target_func)
    return task, model


class Dattri(Estimator):
    """The shared shape of the dattri peers: build an attributor in :meth:`fit` (dattri's
    ``cache``), score with its ``attribute``.

    Args:
        modules: the tracked layers (``all``, ``mlp_only`` or a regex), as tda-bench's.
        chunk_size: training examples per batch of dattri's loops (None: the whole
            training set as one batch).
    """

    name = "dattri"
    ours = "grad_dot"  # tda-bench's estimator of the same method (named in refusals)

    def __init__(self, modules: str | None = None, chunk_size: int | None = 256):
        require("dattri", self.name)
        self.modules = GradientOptions(modules).modules  # validated as for our estimators
        self.chunk_size = positive("chunk_size", chunk_size, integer=True, allow_none=True)
        self.attributor = None
        self.batches: FlatBatches | None = None

    def attributor_for(self, problem: AttributionProblem, layer_name: list[str]):
        """The dattri attributor (subclasses)."""
        raise NotImplementedError

    def fit(self, problem: AttributionProblem) -> None:
        self.batches = FlatBatches.of(problem)
        check_per_example_vmap(problem, self.batches, self.name, self.ours)
        names = tracked_parameter_names(problem.model, self.modules or problem.modules)
        self.attributor = self.attributor_for(problem, names)
        with per_example_vmap(self.name, self.ours):
            self.cache(problem)

    def cache(self, problem: AttributionProblem) -> None:
        """dattri's ``cache`` on the full training set (one batch)."""
        self.attributor.cache(self.batches.loader(problem, "train"))

    def score(self, problem: AttributionProblem) -> Tensor:
        """``[n_queries, n_train]``: dattri's scores, transposed (positive = proponent)."""
        if self.attributor is None:
            self.fit(problem)
        train = self.batches.loader(problem, "train", self.chunk_size)
        queries = self.batches.loader(problem, "queries", self.chunk_size)
        with torch.enable_grad(), per_example_vmap(self.name, self.ours):
            return self.attribute(train, queries).T.detach().cpu().contiguous()

    def attribute(self, train, queries) -> Tensor:
        """dattri's ``[n_train, n_queries]`` scores (its ``attribute`` takes train first)."""
        return self.attributor.attribute(train, queries)

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        """``[n_train]``: dattri's ``self_attribute``."""
        if self.attributor is None:
            self.fit(problem)
        train = self.batches.loader(problem, "train", self.chunk_size)
        with torch.enable_grad(), per_example_vmap(self.name, self.ours):
            return self.attributor.self_attribute(train).detach().cpu().reshape(-1)


def check_parameters(problem: AttributionProblem, modules: str | None, max_params: int,
                     name: str) -> int:
    """The number of tracked parameters P, refused above ``max_params`` (dattri's explicit
    inverse forms the P × P Hessian with torch.func in one batch)."""
    count = sum(dict(problem.model.named_parameters())[n].numel()
                for n in tracked_parameter_names(problem.model, modules))
    if count > max_params:
        raise ValueError(f"{name} forms the full {count} x {count} Hessian of the tracked "
                         f"parameters (more than max_params={max_params}); use dattri_arnoldi, "
                         "kronfluence_ekfac or ekfac, or set estimator.modules to fewer layers.")
    return count
