"""The task interface, and the Lightning training loop every task shares.

A task owns its data split (fixed by ``split_seed``, never by the model seed), builds and
trains its model through a Lightning ``LightningModule`` + ``Trainer``, and describes the
attribution problem. Ground-truth retraining (in ``bench``) calls the same :meth:`Task.fit`
on subsets of the training set, so retrained models share every hyperparameter with the
attributed one.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from estimators.problem import AttributionProblem, Checkpoint, move_to

for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


class Task(ABC):
    """A benchmark task.

    Class attributes:
        VERSION: bump whenever a code change alters trained models or measurements; it is
            part of every cache key (models and ground truth).
        convex: whether the training objective is convex, so that leave-one-out retraining
            is well defined (LOO ground truth is offered only then).

    Args:
        split_seed: seed of the train/query split.
        lds: LDS ground-truth settings (``subsets``, ``fraction``, ``seeds``) or None.
        loo: LOO ground-truth settings (``n``) or None; only for convex tasks.
        pbrf: PBRF ground-truth settings (see :mod:`bench.pbrf`) or None. It depends on the
            attributed model, so it is not among the retraining kinds of ``ground_truths``.
        device: where models train and are attributed (``cpu``, ``cuda``, ``auto``).
    """

    VERSION = 1
    convex = False

    def __init__(self, split_seed: int = 0, lds: dict | None = None, loo: dict | None = None,
                 device: str = "cpu", pbrf: dict | None = None):
        if loo and not self.convex:
            raise ValueError(
                f"{type(self).__name__} is not convex: removing one training point moves a "
                "non-convex model less than a change of seed, so LOO is not offered; set "
                "task.loo=null and use LDS."
            )
        self.split_seed = int(split_seed)
        self.lds = dict(lds) if lds else None
        self.loo = dict(loo) if loo else None
        self.pbrf = dict(pbrf) if pbrf else None
        self.device = resolve_device(device)

    @property
    def ground_truths(self) -> list[str]:
        """The ground-truth kinds this task offers, e.g. ``["loo", "lds"]``."""
        return [k for k in ("loo", "lds") if getattr(self, k)]

    @property
    @abstractmethod
    def n_train(self) -> int:
        """Number of training examples."""

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; its initial weights depend only on ``seed``."""

    @abstractmethod
    def fit(self, model: nn.Module, seed: int, indices: Tensor | None = None,
            progress: bool = False) -> list[Checkpoint]:
        """Trains ``model`` in place on the training examples ``indices`` (all if None).

        Returns:
            the checkpoints recorded during training, the final one last.
        """

    @abstractmethod
    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        """The attribution problem of a trained model."""

    def measure_queries(self, model: nn.Module, batch_size: int = 256) -> Tensor:
        """The measurement of every query under ``model``: ``[n_queries]``, float64, on CPU."""
        problem = self.problem(model, [])
        model.eval()
        values = []
        with torch.no_grad():
            for batch in problem.loader("queries", batch_size):
                batch = move_to(batch, problem.device)
                values.append(problem.query_measure(model, batch).double().cpu())
        return torch.cat(values)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other values are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu or auto.")
    return device


class _RecordOptimizer(L.Callback):
    """Keeps the optimizer's state and learning rate at the end of training."""

    def __init__(self):
        self.state: dict[str, Any] | None = None
        self.lr = 0.0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.lr = float(optimizer.param_groups[0]["lr"])
        self.state = optimizer.state_dict()


def lightning_fit(module: L.LightningModule, data: Dataset, *, indices: Tensor | None,
                  batch_size: int, epochs: int, seed: int, device: str, precision: str = "32-true",
                  progress: bool = False, collate_fn=None) -> list[Checkpoint]:
    """Trains a LightningModule on (a subset of) ``data`` with a seeded shuffle.

    ``module.model`` must be the attributed ``nn.Module``; it is trained in place.

    Returns:
        ``[Checkpoint]`` of the final state, with the learning rate and optimizer state.
    """
    if indices is not None:
        data = Subset(data, indices.tolist())
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True,
                        generator=generator, collate_fn=collate_fn)
    recorder = _RecordOptimizer()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
        precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, callbacks=[recorder],
        deterministic=False,
    )
    trainer.fit(module, loader)
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    return [Checkpoint(state, lr=recorder.lr, step=trainer.global_step,
                       optimizer_state=recorder.state)]
