"""scikit-learn's bundled digits (8×8 images, 10 classes; no download), shared by the
``digits_logreg`` and ``digits_mlp`` tasks.

Batches are ``(x [B, 64], y [B])``. The training loss is the per-example cross entropy
(never the L2 term, which enters the curvature as λ₂I); the measurement is the margin
``logit_y − logsumexp_{c≠y} logit_c`` (higher is better).
"""

from __future__ import annotations

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

N_DIGITS = 1797


def load_digits_split(n_train: int, n_queries: int, split_seed: int,
                      dtype: torch.dtype) -> tuple[TensorDataset, TensorDataset]:
    """A seeded split of the digits into disjoint training and query sets."""
    from sklearn.datasets import load_digits

    if n_train + n_queries > N_DIGITS:
        raise OptionError(f"{{n_train}} + {{n_queries}} must be at most {N_DIGITS} (the digits "
                          f"data set), got {n_train} + {n_queries}")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=dtype) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(N_DIGITS, generator=torch.Generator().manual_seed(split_seed))
    train, queries = perm[:n_train], perm[n_train:n_train + n_queries]
    return TensorDataset(x[train], y[train]), TensorDataset(x[queries], y[queries])


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


class ClassifierModule(L.LightningModule):
    """Mean cross entropy (+ (λ₂/2)‖θ‖² for optimizers without weight decay) of ``model``.

    Args:
        model: the classifier.
        optimizer: ``sgd`` (weight decay λ₂) or ``lbfgs`` (full batch, L2 in the loss).
        optim: the optimizer's keyword arguments (lr, momentum, tolerances, ...).
        l2: λ₂.
    """

    def __init__(self, model: nn.Module, optimizer: str, optim: dict, l2: float):
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer
        self.optim = dict(optim)
        self.l2 = l2

    def objective(self, model: nn.Module, batch) -> Tensor:
        """The scalar training loss of ``model`` on ``batch`` (also used by ensembles)."""
        loss = per_example_ce(model(batch[0]), batch).mean()
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


class DigitsTask(Task):
    """Common data, problem and training of the digits tasks.

    Args:
        n_train: training examples (about 1,000).
        n_queries: held-out query examples (about 100).
        l2: λ₂ of the training objective.
        batch_size, epochs: training loop.
        optim: optimizer keyword arguments.
        checkpoints: ``{every_n_epochs: n}`` / ``{every_n_steps: n}``: intermediate
            checkpoints recorded when the attributed model trains (never in ground-truth
            retraining on subsets); None keeps only the final state.
        split_seed, lds, loo, device: see :class:`~tasks.base.Task`.
    """

    dtype = torch.float32
    optimizer = "sgd"
    precision = "32-true"
    ensemble_size = 256  # models per vectorised pass of fit_many
    has_text = False

    def __init__(self, n_train: int = 1000, n_queries: int = 100, l2: float = 1e-3,
                 batch_size: int = 32, epochs: int = 20, optim: dict | None = None,
                 checkpoints: dict | None = None, **task):
        super().__init__(**task)
        n_train = positive("n_train", n_train, integer=True)
        n_queries = positive("n_queries", n_queries, integer=True)
        self.l2 = bounded("l2", l2, 0)
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.epochs = positive("epochs", epochs, integer=True)
        self.optim = dict(optim or {})
        self.checkpoints = dict(checkpoints) if checkpoints else None
        if self.checkpoints is not None:
            try:
                RecordCheckpoints(**self.checkpoints)  # checks its keys and values
            except TypeError:
                raise OptionError(f"{{checkpoints}} takes every_n_epochs and/or every_n_steps, "
                                  f"got {literal(self.checkpoints)}") from None
        self._check_optimizer()
        self.train_set, self.query_set = load_digits_split(n_train, n_queries, self.split_seed,
                                                           self.dtype)

    def _check_optimizer(self) -> None:
        """Builds the optimizer once on a dummy parameter, so a bad ``optim`` value is refused
        before any training (naming the key)."""
        module = ClassifierModule(nn.Identity(), self.optimizer, self.optim, self.l2)
        try:
            module.optimizer_for([torch.zeros(1, requires_grad=True)])
        except (TypeError, ValueError) as err:
            raise OptionError(f"{{optim}} = {escape(self.optim)} is not accepted by the "
                              f"{self.optimizer} optimizer ({escape(err)}); check its keys and "
                              "values") from None

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    def fit(self, model: nn.Module, seed: int, indices: Tensor | None = None,
            progress: bool = False) -> list[Checkpoint]:
        module = ClassifierModule(model, self.optimizer, self.optim, self.l2)
        return lightning_fit(module, self.train_set, indices=indices,
                             batch_size=self.batch_size, epochs=self.epochs, seed=seed,
                             device=self.device, precision=self.precision, progress=progress,
                             checkpoints=self.checkpoints if indices is None else None)

    def fit_many(self, seeds: list[int], subsets: list[Tensor],
                 progress: bool = False) -> Tensor | None:
        """Trains ``build_model(seeds[m])`` on ``subsets[m]`` with shuffle seed ``seeds[m]`` for
        every m as one vectorised ensemble (see :mod:`tasks.ensemble`), in passes of at most
        ``ensemble_size`` models.

        Returns:
            ``[M, n_queries]`` float64 measurements, or None where the optimizer cannot be
            vectorised (L-BFGS) or the subsets differ in size.
        """
        from tasks.ensemble import EnsembleModule, ensemble_batches, fit_ensemble

        if self.optimizer != "sgd" or len({len(s) for s in subsets}) > 1:
            return None
        recipe = ClassifierModule(nn.Identity(), self.optimizer, self.optim, self.l2)
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
            outputs=logits_of, loss=per_example_ce, measure=margin,
            sample_targets=sample_labels, l2=self.l2, checkpoints=checkpoints,
        )
