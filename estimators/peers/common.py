"""What every peer estimator shares: the library check, the scratch folder, the tracked
parameters, and the problem's batches as the flat tuples of tensors that the torch.func
libraries (dattri, TRAK) take.

* :func:`require` imports a peer library or refuses in one sentence naming the extra.
* :class:`Scratch`: the folder a library writes its factors, features or scores to (under
  the run folder in a harness run, a temporary folder otherwise), removed after scoring
  unless ``keep_scratch``.
* :func:`tracked_parameter_names`: the parameters tda-bench attributes through (those of
  :func:`~estimators.gradients.tracked_layers`), so that a peer and our estimator take
  gradients with respect to the same θ.
* :class:`FlatBatches`: a collated batch ``{input_ids [B, T], ...}`` or ``[x [B, d], y [B]]``
  as a list of tensors ``[leaf [B, ...], ...]`` and back, whether a library hands a leaf
  back with its batch dimension (``[1, ...]``), without it (one example under
  ``torch.func.vmap``) or cast to float (dattri's LiSSA sampler).
* :func:`functional_outputs`: ``(params, batch) -> outputs`` through the problem's own
  ``outputs`` with the parameters swapped in (``torch.func.functional_call``).
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, default_collate

from estimators.gradients import tracked_layers
from estimators.options import flag
from estimators.problem import AttributionProblem, Batch

EXTRA = 'pip install -e ".[peers]"'


def require(module: str, peer: str) -> Any:
    """Imports ``module`` (a peer library) or raises one sentence that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"estimator {peer} needs the {module} library, which is not "
                         f"installed: run {EXTRA} (torch pinned first, see "
                         "docs/estimators.md#peers).") from None
    except (RuntimeError, OSError) as err:  # e.g. a CUDA-only torchvision beside CPU torch
        raise ValueError(f"estimator {peer} could not import {module} ({err}); reinstall "
                         f"the extra with {EXTRA} and uninstall torchvision after it.") from None


class Scratch:
    """Where a library writes its files: ``directory`` or, when None, a temporary folder.

    Args:
        directory: the scratch folder (the harness sets one under the run folder).
        keep: keep the files after scoring (default: removed).
    """

    def __init__(self, directory: str | Path | None, keep: bool = False):
        self.directory = Path(directory) if directory else None
        self.keep = flag("keep_scratch", keep)
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        """The folder, created on first use."""
        if self._path is None:
            if self.directory is None:
                self._path = Path(tempfile.mkdtemp(prefix="tda-bench-peer-"))
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._path = self.directory
        return self._path

    def done(self) -> None:
        """Removes the files (unless ``keep``)."""
        if self._path is not None and not self.keep:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


def tracked_parameter_names(model: nn.Module, modules: str | None) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the tracked layers' weights and biases."""
    names = []
    for layer in tracked_layers(model, modules):
        prefix = f"{layer.name}." if layer.name else ""  # "" when the model is the layer
        names.append(f"{prefix}weight")
        if getattr(layer.module, "bias", None) is not None:
            names.append(f"{prefix}bias")
    return names


@dataclass(frozen=True)
class FlatBatches:
    """A problem's collated batches as flat lists of tensors, and back.

    Attributes:
        structure: the batch's nesting (dicts, lists, tuples) with leaf indices at the leaves.
        ndims: each leaf's number of dimensions in a collated batch (batch dimension first).
        dtypes: each leaf's dtype.
        collate: the problem's collate function (``default_collate`` when it has none).
    """

    structure: Any
    ndims: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    collate: Callable[[list], Batch]

    @classmethod
    def of(cls, problem: AttributionProblem) -> FlatBatches:
        collate = problem.collate_fn or default_collate
        batch = collate([problem.train[0]])
        leaves: list[Tensor] = []
        structure = _split(batch, leaves)
        return cls(structure, tuple(t.ndim for t in leaves), tuple(t.dtype for t in leaves),
                   collate)

    def flatten(self, batch: Batch) -> list[Tensor]:
        """``[leaf [B, ...], ...]`` of a collated batch."""
        leaves: list[Tensor] = []
        _split(batch, leaves)
        return leaves

    def rebuild(self, leaves: Sequence[Tensor]) -> Batch:
        """The batch of ``leaves``; a leaf without its batch dimension (one example under
        ``vmap``) gets a batch of one, and every leaf its original dtype."""
        fixed = [leaf.unsqueeze(0) if leaf.ndim == n - 1 else leaf
                 for leaf, n in zip(leaves, self.ndims, strict=True)]
        fixed = [leaf if leaf.dtype == dtype else leaf.to(dtype)
                 for leaf, dtype in zip(fixed, self.dtypes, strict=True)]
        return _join(self.structure, fixed)

    def loader(self, problem: AttributionProblem, which: str, batch_size: int | None = None
               ) -> DataLoader:
        """An unshuffled loader of flat batches over ``train`` or ``queries`` (``batch_size``
        None: the whole split as one batch)."""
        data = {"train": problem.train, "queries": problem.queries}[which]
        return DataLoader(data, batch_size=batch_size or len(data), shuffle=False,
                          collate_fn=lambda items: self.flatten(self.collate(items)))


def _split(batch: Batch, leaves: list[Tensor]) -> Any:
    if isinstance(batch, Tensor):
        leaves.append(batch)
        return len(leaves) - 1
    if isinstance(batch, dict):
        return {k: _split(v, leaves) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_split(v, leaves) for v in batch)
    raise ValueError(f"the peer libraries take batches of tensors, but this task's batch holds "
                     f"a {type(batch).__name__}; use a tda-bench estimator for it.")


def _join(structure: Any, leaves: Sequence[Tensor]) -> Batch:
    if isinstance(structure, int):
        return leaves[structure]
    if isinstance(structure, dict):
        return {k: _join(v, leaves) for k, v in structure.items()}
    return type(structure)(_join(v, leaves) for v in structure)


class _Outputs(nn.Module):
    """``batch -> problem.outputs(model, batch)`` as a module, for ``functional_call``."""

    def __init__(self, model: nn.Module, outputs: Callable[[nn.Module, Batch], Tensor]):
        super().__init__()
        self.model = model
        self.fn = outputs

    def forward(self, batch: Batch) -> Tensor:
        return self.fn(self.model, batch)


def functional_outputs(problem: AttributionProblem, model: nn.Module
                       ) -> Callable[[dict[str, Tensor], Batch], Tensor]:
    """``(params {name: tensor}, batch) -> outputs`` of ``model`` (parameters not given keep
    their values; attention through SDPA's math backend, which torch.func can vmap and
    differentiate twice)."""
    wrapper = _Outputs(model, problem.outputs)

    def outputs(params: dict[str, Tensor], batch: Batch) -> Tensor:
        swapped = {f"model.{k}": v for k, v in params.items()}
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(wrapper, swapped, (batch,))

    return outputs


@contextmanager
def per_example_vmap(peer: str, alternative: str) -> Iterator[None]:
    """Turns torch.func's refusal to vmap a model into one sentence: dattri and TRAK take
    per-example gradients with ``vmap``, which fails on models whose forward branches on
    tensor values (transformers' attention masks do)."""
    try:
        yield
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        raise ValueError(f"{peer} takes per-example gradients with torch.func.vmap, which "
                         "cannot run this model's forward (it branches on tensor values, as "
                         f"transformers' attention masks do); use {alternative} instead."
                         ) from None


def check_per_example_vmap(problem: AttributionProblem, batches: FlatBatches, peer: str,
                           alternative: str) -> None:
    """Refuses (one sentence) before any work when ``vmap`` cannot take per-example
    gradients of this model: one vmapped gradient of the loss on two training examples."""
    outputs = functional_outputs(problem, problem.model)
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    leaves = batches.flatten(batches.collate([problem.train[i]
                                              for i in range(min(2, problem.n_train))]))

    def loss(p: dict[str, Tensor], *example: Tensor) -> Tensor:
        batch = batches.rebuild(example)
        return problem.loss(outputs(p, batch), batch).sum()

    with per_example_vmap(peer, alternative), torch.enable_grad():
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, *[0] * len(leaves)))(
            params, *leaves)
