"""The task interface, and the Lightning training loop every task shares.

A task owns its data split (fixed by ``split_seed``, never by the model seed), builds and
trains its model through a Lightning ``LightningModule`` + ``Trainer``, and describes the
attribution problem. Ground-truth retraining (in ``bench``) calls the same :meth:`Task.fit`
on subsets of the training set, so retrained models share every hyperparameter with the
attributed one.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from estimators.options import OptionError, literal, names_arguments, natural, positive
from estimators.problem import AttributionProblem, Checkpoint, eval_mode, move_to

for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*The `srun` command is available.*")  # single-process fits


class Task(ABC):
    """A benchmark task.

    Class attributes:
        VERSION: bump whenever a code change alters trained models or measurements; it is
            part of every cache key (models and ground truth).
        convex: whether the training objective is convex, so that leave-one-out retraining
            is well defined (the ``loo`` ground truth refuses other tasks).
        retrainable: whether :meth:`fit` can train the model on a subset of the training
            set (the retraining ground truths, ``lds`` and ``loo``, refuse other tasks).
        has_text: whether the problem carries the training and query text (lexical
            estimators need it); None where the task does not say (then it is not checked
            before the run).
        trains: whether :meth:`fit` trains the model at all; a task whose model is given
            (``hf_lm``) returns its weights, is never cached as a trained model, and names
            the model and data by content in :meth:`identity`.

    Args:
        split_seed: seed of the train/query split.
        device: where models train and are attributed (``cpu``, ``cuda``, ``auto``).
        **truths: the settings of each ground-truth kind the task offers, under the kind's
            name (``lds``, ``loo``, ``pbrf``, or a plug-in's; see ``bench.truths``), None to
            disable one. The harness checks the names and values before any work.

    A bad argument raises :class:`~estimators.options.OptionError`, which names the task's
    class (and ``task.<key>`` on the command line).
    """

    VERSION = 1
    convex = False
    retrainable = True
    has_text: bool | None = None
    trains = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names_arguments(cls, "task")

    def __init__(self, split_seed: int = 0, device: str = "cpu", **truths: dict | None):
        self.split_seed = natural("split_seed", split_seed)
        self.device = resolve_device(device)
        self.truths: dict[str, dict] = {}
        for name, settings in truths.items():
            if settings is not None and not isinstance(settings, Mapping):
                raise OptionError(f"{{{name}}} is not a setting of this task, and a ground-truth "
                                  f"kind's settings are a mapping or {{null}}, got "
                                  f"{literal(settings)}; check the key's spelling")
            if settings:
                self.truths[name] = dict(settings)

    @property
    def ground_truths(self) -> list[str]:
        """The ground-truth kinds configured for this task, e.g. ``["lds", "pbrf"]``."""
        return list(self.truths)

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

    def identity(self) -> dict | None:
        """What determines the model and the training data beyond the task's config (e.g.
        hashes of the files of a given model), or None when the config determines them. It
        replaces the config in the model's cache key, which keys the factor and gradient
        caches."""
        return None

    def fit_many(self, seeds: list[int], subsets: list[Tensor],
                 progress: bool = False) -> Tensor | None:
        """Optional vectorised retraining: model m = ``build_model(seeds[m])`` fitted with
        ``fit(model, seeds[m], subsets[m])``, all at once.

        Returns:
            ``[M, n_queries]`` measurements (``measure_queries`` of each model), or None when
            the task cannot vectorise these fits (the default): callers then fit one by one.
        """
        return None

    @abstractmethod
    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        """The attribution problem of a trained model."""

    def measure_queries(self, model: nn.Module, batch_size: int = 256) -> Tensor:
        """The measurement of every query under ``model``: ``[n_queries]``, float64, on CPU."""
        problem = self.problem(model, [])
        values = []
        with eval_mode(model), torch.no_grad():
            for batch in problem.loader("queries", batch_size):
                batch = move_to(batch, problem.device)
                values.append(problem.query_measure(model, batch).double().cpu())
        return torch.cat(values)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:<i>``
    are checked (CUDA present, the index in range)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise OptionError(f"device must be cpu, cuda, cuda:<index> or auto, got "
                          f"{literal(device)}", scope="")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError(f"device={device} but CUDA is not available here; use device=cpu "
                              "or device=auto", scope="")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise OptionError(f"device={device} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); use a smaller "
                              "index or device=cuda", scope="")
    return device


def _snapshot(trainer: L.Trainer, pl_module: L.LightningModule) -> Checkpoint:
    """The model's parameters, the learning rate in force and the optimizer state, copied."""
    optimizer = trainer.optimizers[0]
    state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
    return Checkpoint(state, lr=float(optimizer.param_groups[0]["lr"]), step=trainer.global_step,
                      optimizer_state=copy.deepcopy(optimizer.state_dict()))


class RecordCheckpoints(L.Callback):
    """Records intermediate checkpoints during training (for TracIn and TrackStar).

    Args:
        every_n_epochs: record at the end of every n-th epoch (or None).
        every_n_steps: record after every n-th optimizer step (or None).

    The state after the last step is always recorded by :func:`lightning_fit`, so a
    recording that falls on it is not repeated.
    """

    def __init__(self, every_n_epochs: int | None = None, every_n_steps: int | None = None):
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            positive(f"checkpoints.{name}", value, integer=True, allow_none=True)
        self.every_n_epochs = int(every_n_epochs) if every_n_epochs else None
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.recorded: list[Checkpoint] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and self._new(step):
            self.recorded.append(_snapshot(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 \
                and self._new(trainer.global_step):
            self.recorded.append(_snapshot(trainer, pl_module))

    def _new(self, step: int) -> bool:
        return not self.recorded or self.recorded[-1].step != step


class _RecordOptimizer(L.Callback):
    """Keeps the optimizer's state and learning rate at the end of training."""

    def __init__(self):
        self.final: Checkpoint | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final = _snapshot(trainer, pl_module)


def lightning_fit(module: L.LightningModule, data: Dataset, *, indices: Tensor | None,
                  batch_size: int, epochs: int, seed: int, device: str, precision: str = "32-true",
                  progress: bool = False, collate_fn=None,
                  checkpoints: dict | None = None) -> list[Checkpoint]:
    """Trains a LightningModule on (a subset of) ``data`` with a seeded shuffle.

    ``module.model`` must be the attributed ``nn.Module``; it is trained in place.

    Args:
        checkpoints: ``{every_n_epochs: n}`` and/or ``{every_n_steps: n}`` to record
            intermediate checkpoints (see :class:`RecordCheckpoints`); None records only the
            final state (what ground-truth retraining uses).

    Returns:
        ``[Checkpoint]`` in training order, the final state last, each with the learning rate
        in force and a copy of the optimizer state.
    """
    if indices is not None:
        data = Subset(data, indices.tolist())
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True,
                        generator=generator, collate_fn=collate_fn)
    recorder = _RecordOptimizer()
    callbacks: list[L.Callback] = [recorder]
    intermediate = RecordCheckpoints(**(checkpoints or {})) if checkpoints else None
    if intermediate is not None:
        callbacks.insert(0, intermediate)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
        precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, callbacks=callbacks,
        deterministic=False,
    )
    trainer.fit(module, loader)
    final = recorder.final
    recorded = intermediate.recorded if intermediate is not None else []
    recorded = [c for c in recorded if c.step != final.step]
    return [*recorded, final]
