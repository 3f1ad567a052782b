"""Supervised tasks on in-memory tensors, shared by the digits tasks, ``digits_cnn``,
``images`` and ``regression``.

A :class:`SupervisedTask` holds its training and query sets as ``TensorDataset`` s of
``(x [N, ...], y [N])``, trains its model with Lightning (SGD with weight decay λ₂, or
full-batch L-BFGS with (λ₂/2)‖θ‖² in the loss), retrains many models at once as a vectorised
ensemble where it can (:mod:`tasks.ensemble`), and hands the estimators a problem whose
per-example ``loss``, ``measure`` and ``sample_targets`` the subclass chooses. Classification
uses the ones below: the training loss is the per-example cross entropy (never the L2 term,
which enters the curvature as λ₂I), the measurement the margin
``logit_y − logsumexp_{c≠y} logit_c`` (higher is better), the true Fisher's targets drawn from
the softmax.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from estimators.options import OptionError, bounded, escape, literal, positive
from estimators.problem import (
    AttributionProblem,
    Checkpoint,
    cross_entropy_sum,
    sample_categorical,
)
from tasks.base import RecordCheckpoints, Task, lightning_fit

PerExample = Callable[[Tensor, tuple[Tensor, ...]], Tensor]
OPTIMIZERS = ("sgd", "lbfgs")


def logits_of(model: nn.Module, batch) -> Tensor:
    return model(batch[0])


def per_example_ce(logits: Tensor, batch) -> Tensor:
    return cross_entropy_sum(logits, batch[1])


def margin(logits: Tensor, batch) -> Tensor:
    """``[B]``: correct logit minus the logsumexp of the other logits."""
    y = batch[1]
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def sample_labels(logits: Tensor, batch, generator: torch.Generator):
    return (batch[0], sample_categorical(logits, batch[1], generator))


def relu_mlp(widths: list[int], seed: int, dtype: torch.dtype) -> nn.Sequential:
    """``Linear(widths[0], widths[1]), ReLU, ..., Linear(widths[-2], widths[-1])`` initialised
    from ``seed`` (without touching the global RNG), in ``dtype`` whatever torch's default."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers).to(dtype)


class SupervisedModule(L.LightningModule):
    """Mean per-example ``loss`` (+ (λ₂/2)‖θ‖² for L-BFGS, which has no weight decay).

    Args:
        model: the attributed network.
        loss: per-example training loss ``(outputs, batch) -> [B]``.
        optimizer: ``sgd`` (weight decay λ₂) or ``lbfgs`` (full batch, L2 in the loss).
        optim: the optimizer's keyword arguments (lr, momentum, tolerances, ...).
        l2: λ₂.
    """

    def __init__(self, model: nn.Module, loss: PerExample, optimizer: str, optim: dict,
                 l2: float):
        super().__init__()
        self.model = model
        self.loss = loss
        self.optimizer_name = optimizer
        self.optim = dict(optim)
        self.l2 = l2

    def objective(self, model: nn.Module, batch) -> Tensor:
        """The scalar training loss of ``model`` on ``batch`` (also used by ensembles)."""
        loss = self.loss(model(batch[0]), batch).mean()
        if self.optimizer_name == "lbfgs" and self.l2:
            loss = loss + 0.5 * self.l2 * sum(p.pow(2).sum() for p in model.parameters())
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return self.objective(self.model, batch)

    def optimizer_for(self, params) -> torch.optim.Optimizer:
        """The optimizer, with its hyperparameters, over ``params``."""
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, weight_decay=self.l2, **self.optim)
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(params, line_search_fn="strong_wolfe", **self.optim)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}: use sgd or lbfgs")

    def configure_optimizers(self):
        return self.optimizer_for(self.model.parameters())


class SupervisedTask(Task):
    """Training, vectorised retraining and the problem of a supervised task.

    Subclasses set ``train_set`` and ``query_set`` (``TensorDataset`` s of ``(x, y)``) and
    :meth:`build_model`; they may replace the class attributes below.

    Class attributes:
        dtype, precision: of the data and of Lightning's training loop.
        optimizer: ``sgd`` or ``lbfgs``.
        ensemble_size: models per vectorised pass of :meth:`fit_many`.
        loss, measure, sample_targets: the problem's per-example functions (classification by
            default: cross entropy, margin, labels drawn from the softmax).

    Args:
        l2: λ₂ of the training objective.
        batch_size, epochs: training loop.
        optim: optimizer keyword arguments.
        checkpoints: ``{every_n_epochs: n}`` / ``{every_n_steps: n}``: intermediate
            checkpoints recorded when the attributed model trains (never in ground-truth
            retraining on subsets); None keeps only the final state.
        **task: ``split_seed``, ``device`` and ground-truth settings
            (:class:`~tasks.base.Task`).
    """

    dtype = torch.float32
    optimizer = "sgd"
    precision = "32-true"
    ensemble_size = 256
    has_text = False
    loss = staticmethod(per_example_ce)
    measure = staticmethod(margin)
    sample_targets = staticmethod(sample_labels)
    train_set: TensorDataset
    query_set: TensorDataset

    def __init__(self, l2: float = 1e-3, batch_size: int = 32, epochs: int = 20,
                 optim: dict | None = None, checkpoints: dict | None = None, **task):
        super().__init__(**task)
        self.l2 = bounded("l2", l2, 0)
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.epochs = positive("epochs", epochs, integer=True)
        self.optim = dict(optim or {})
        self.checkpoints = dict(checkpoints) if checkpoints else None
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"task.optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if self.checkpoints is not None:
            try:
                RecordCheckpoints(**self.checkpoints)  # checks its keys and values
            except TypeError:
                raise OptionError(f"{{checkpoints}} takes every_n_epochs and/or every_n_steps, "
                                  f"got {literal(self.checkpoints)}") from None
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        """Builds the optimizer once on a dummy parameter, so a bad ``optim`` value is refused
        before any training (naming the key)."""
        try:
            self.module(nn.Identity()).optimizer_for([torch.zeros(1, requires_grad=True)])
        except (TypeError, ValueError) as err:
            raise OptionError(f"{{optim}} = {escape(self.optim)} is not accepted by the "
                              f"{self.optimizer} optimizer ({escape(err)}); check its keys and "
                              "values") from None

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    def module(self, model: nn.Module) -> SupervisedModule:
        """The Lightning module that trains ``model`` with this task's objective."""
        return SupervisedModule(model, self.loss, self.optimizer, self.optim, self.l2)

    def fit(self, model: nn.Module, seed: int, indices: Tensor | None = None,
            progress: bool = False) -> list[Checkpoint]:
        return lightning_fit(self.module(model), self.train_set, indices=indices,
                             batch_size=self.batch_size, epochs=self.epochs, seed=seed,
                             device=self.device, precision=self.precision, progress=progress,
                             checkpoints=self.checkpoints if indices is None else None)

    def vectorisable(self, model: nn.Module) -> bool:
        """Whether :meth:`fit_many` can train copies of ``model`` as one ensemble: SGD, and no
        module that keeps running statistics (batch norm updates buffers in place)."""
        stateful = any(getattr(m, "track_running_stats", False) for m in model.modules())
        return self.optimizer == "sgd" and not stateful

    def fit_many(self, seeds: list[int], subsets: list[Tensor],
                 progress: bool = False) -> Tensor | None:
        """Trains ``build_model(seeds[m])`` on ``subsets[m]`` with shuffle seed ``seeds[m]`` for
        every m as one vectorised ensemble (see :mod:`tasks.ensemble`), in passes of at most
        ``ensemble_size`` models.

        Returns:
            ``[M, n_queries]`` float64 measurements, or None where the model or optimizer
            cannot be vectorised (:meth:`vectorisable`) or the subsets differ in size.
        """
        from tasks.ensemble import EnsembleModule, ensemble_batches, fit_ensemble

        if len({len(s) for s in subsets}) > 1 or not self.vectorisable(self.build_model(0)):
            return None
        recipe = self.module(nn.Identity())
        out = []
        for start in range(0, len(seeds), self.ensemble_size):
            part = slice(start, start + self.ensemble_size)
            models = [self.build_model(int(s)) for s in seeds[part]]
            module = EnsembleModule(models, self.train_set, recipe.objective, recipe.optimizer_for)
            steps = ensemble_batches(seeds[part], subsets[part], self.batch_size, self.epochs)
            fit_ensemble(module, steps, models, self.device, self.precision, progress)
            out += [self.measure_queries(model.to(self.device)) for model in models]
        return torch.stack(out)

    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        return AttributionProblem(
            model=model, train=self.train_set, queries=self.query_set, collate_fn=None,
            outputs=logits_of, loss=self.loss, measure=self.measure,
            sample_targets=self.sample_targets, l2=self.l2, checkpoints=checkpoints,
        )
