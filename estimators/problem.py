"""The attribution problem: the one value a task hands to an estimator.

This module is the estimators' input contract (as kronfluence's ``Task`` is its users'):
tasks import it, and nothing else from ``estimators``. It holds what every estimator needs
and nothing task-specific:

* the trained model, and the training checkpoints with their learning rates and optimizer
  state (TracIn, TrackStar);
* the training set and the queries, as datasets with one collate function;
* ``outputs(model, batch)``: the model's raw outputs (logits ``[B, C]`` or ``[B, T, V]``);
* ``loss(outputs, batch)``: per-example training loss ``[B]`` (for a document of a
  token-averaged LM objective, its *summed* token NLL; never a regulariser);
* ``measure(outputs, batch)``: per-example query measurement ``[B]``, higher is better;
* ``sample_targets(outputs, batch, generator)``: the batch with its targets drawn from the
  model's predictive distribution (the true Fisher of K-FAC);
* ``l2``: the coefficient of an L2 regulariser (λ₂/2)‖θ‖² in the training objective, which
  enters every curvature as λ₂I and never a training example's gradient;
* the text of training examples and queries, where the task has text (BM25);
* optional capabilities, typed, ``None`` where a task does not offer them: the queries'
  ``proponents`` (fact tracing), ``query_groups`` (e.g. forward and flipped facts),
  ``flipped_labels`` (mislabel detection), ``tail_patch`` (one training step on one
  document), a ``model_factory`` (more trained models of the same task, for ensembles) and
  ``task_metrics`` (numbers the task reports about its model, e.g. query accuracy).

Splitting the forward pass from the loss keeps the contract small and still gives exact
Gauss-Newton products (J^T ∇²ℓ J) without task-specific code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

Batch = Any
OutputsFn = Callable[[nn.Module, Batch], Tensor]
PerExampleFn = Callable[[Tensor, Batch], Tensor]
SampleFn = Callable[[Tensor, Batch, torch.Generator], Batch]


@dataclass
class Checkpoint:
    """A model state recorded during training.

    Attributes:
        state_dict: the model's parameters at this point.
        lr: learning rate in force for the steps that followed this checkpoint.
        step: optimizer steps taken when it was recorded.
        optimizer_state: the optimizer's ``state_dict()`` (e.g. Adam's moments), or None.
    """

    state_dict: dict[str, Tensor]
    lr: float
    step: int
    optimizer_state: dict[str, Any] | None = None


@dataclass(frozen=True)
class TailPatch:
    """How the tail-patch test takes one training step on one document (Chang et al. 2024).

    Attributes:
        lr: the step's learning rate.
        step_loss: ``(model, batch) -> scalar``, the loss of one training step on a batch.
        adam: the final Adam state ``{step, betas, eps, exp_avg_sq: {parameter name: v}}``
            (see :func:`adam_state`), or None for a plain gradient step.
    """

    lr: float
    step_loss: Callable[[nn.Module, Batch], Tensor]
    adam: dict[str, Any] | None = None


@dataclass
class AttributionProblem:
    """A trained model, its training set and queries, and the functions that define them.

    Every estimator maps a problem to a score matrix ``[n_queries, n_train]`` with the sign
    convention of DESIGN.md: positive means up-weighting the training example raises the
    query's measurement (a proponent).
    """

    model: nn.Module
    train: Dataset
    queries: Dataset
    collate_fn: Callable[[list], Batch]
    outputs: OutputsFn
    loss: PerExampleFn
    measure: PerExampleFn
    sample_targets: SampleFn | None = None
    l2: float = 0.0
    checkpoints: list[Checkpoint] = field(default_factory=list)
    train_text: Sequence[str] | None = None
    query_text: Sequence[str] | None = None
    key: str = ""
    # The layers estimators attribute through when their ``modules`` is null: a filter of
    # estimators.gradients.tracked_layers (hf_lm: "blocks"); None means every linear layer.
    modules: str | None = None
    # Optional capabilities (None: the task does not offer them).
    proponents: list[list[int]] | None = None  # per query: training indices stating its fact
    query_groups: dict[str, list[int]] | None = None  # {group: query indices}; "forward" first
    flipped_labels: Tensor | None = None  # bool [n_train]: training labels the task corrupted
    tail_patch: TailPatch | None = None
    model_factory: Callable[[int], nn.Module] | None = None  # seed -> another trained model
    task_metrics: dict[str, float] = field(default_factory=dict)

    def query_group_of(self) -> list[str]:
        """``[n_queries]``: each query's group name ("" where it belongs to none)."""
        names = [""] * self.n_queries
        for name, indices in (self.query_groups or {}).items():
            for q in indices:
                names[int(q)] = name
        return names

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_queries(self) -> int:
        return len(self.queries)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loader(self, which: str, batch_size: int) -> DataLoader:
        """A deterministic, unshuffled loader over ``"train"`` or ``"queries"``."""
        data = {"train": self.train, "queries": self.queries}[which]
        return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn)

    def train_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Per-example training loss ``[B]`` of ``model`` on ``batch``."""
        return self.loss(self.outputs(model, batch), batch)

    def query_measure(self, model: nn.Module, batch: Batch) -> Tensor:
        """Per-example measurement ``[B]`` of ``model`` on a batch of queries."""
        return self.measure(self.outputs(model, batch), batch)

    def to(self, device: torch.device | str) -> AttributionProblem:
        """Moves the model to ``device``; batches follow it (see :func:`move_to`)."""
        self.model.to(device)
        return self


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts ``model`` in eval mode (dropout off, norms frozen) for the block, then restores
    the mode it had, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def move_to(batch: Batch, device: torch.device) -> Batch:
    """Moves every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def adam_state(model: nn.Module, optimizer_state: dict[str, Any] | None) -> dict | None:
    """Adam's final state by parameter name: ``{step, betas, eps, exp_avg_sq: {name: v}}``.

    ``exp_avg_sq`` is the raw (not bias-corrected) second moment. Assumes the optimizer was
    built on ``model.parameters()`` in their natural order, one parameter group (as the
    tasks' Lightning modules do). None when the state holds no Adam moments (e.g. SGD).
    """
    if not optimizer_state or not optimizer_state.get("state"):
        return None
    if not all("exp_avg_sq" in st for st in optimizer_state["state"].values()):
        return None
    group = optimizer_state["param_groups"][0]
    names = [n for n, _ in model.named_parameters()]
    v, step = {}, 0.0
    for index, name in zip(group["params"], names, strict=True):
        state = optimizer_state["state"].get(index)
        if state is not None:
            v[name] = state["exp_avg_sq"].detach()
            step = float(state["step"])
    return {"step": step, "betas": tuple(group["betas"]), "eps": float(group["eps"]),
            "exp_avg_sq": v}


# Cross-entropy helpers shared by classification and language-model tasks. Targets equal to
# ``IGNORE`` (as in transformers' labels) contribute nothing.
IGNORE = -100


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed token cross entropy per example.

    Args:
        logits: ``[B, C]`` or ``[B, T, C]``.
        targets: ``[B]`` or ``[B, T]`` class indices, ``IGNORE`` where masked.

    Returns:
        ``[B]``: the NLL of each example, summed over its positions.
    """
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE, reduction="none",
    )
    return nll.view(targets.shape).reshape(targets.shape[0], -1).sum(dim=1)


def sample_categorical(logits: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
    """Targets drawn from softmax(logits), keeping ``IGNORE`` positions masked.

    Args:
        logits: ``[B, C]`` or ``[B, T, C]``.
        targets: labels of the same leading shape, used only for the mask.

    Returns:
        sampled class indices, shaped like ``targets``.
    """
    probs = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.shape[-1]).cpu()
    cdf = probs.cumsum(-1)  # inverse-CDF draws: ~6× cheaper than torch.multinomial per row
    uniform = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64)
    draws = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    draws = draws.clamp_(max=probs.shape[-1] - 1).view(targets.shape).to(targets.device)
    return torch.where(targets == IGNORE, targets, draws)
