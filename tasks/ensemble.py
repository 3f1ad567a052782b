"""Vectorised ensemble training: M small models trained at once, as M sequential fits would.

Ground truth by retraining (LDS, Park et al. 2023) trains many copies of a small model on
different subsets. Trained one by one, each fit pays the Lightning loop, the Python per-step
overhead and tiny matrix products; trained together, the M models' parameters are stacked
(``torch.func.stack_module_state``) into one ``[M, ...]`` tensor per parameter, a step runs
every model on its own mini-batch with ``vmap`` + ``functional_call``, and one optimizer
updates all of them. The sum of the M models' losses has the per-model gradients as its
gradient, and SGD (momentum, weight decay) acts coordinate by coordinate, so each model
takes exactly the steps it would take alone, up to float rounding of batched products.

Mini-batches reproduce the sequential path (:func:`tasks.base.lightning_fit`): a
``DataLoader(subset, shuffle=True, generator=torch.Generator().manual_seed(seed))`` under a
Lightning fit draws, per epoch, one int64 base seed and one permutation of the subset; when
the last batch is partial, the batch sampler reads the random sampler to its end, which draws
one more (unused, empty) permutation. :func:`shuffle_permutations` makes the same draws from
the same generator; ``tests/test_ensemble.py`` checks the batches against a real Lightning fit
(this mirrors torch's ``RandomSampler``/``BatchSampler``, so a torch upgrade that changes them
fails that test rather than silently changing ground truth).

The steps of all epochs are precomputed as ``[M, b]`` index tensors and fed to one
Lightning fit of a single pass (the schedule is the same; only Lightning's epoch counter
differs, which matters to neither a constant learning rate nor the recorded step count).

Limits: a per-coordinate optimizer (SGD, Adam; not L-BFGS nor global-norm clipping), no
randomness in the forward pass (no dropout), a ``TensorDataset``, and subsets of equal size
(so every model takes the same number of steps).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import TensorDataset

from tasks.base import resolve_device

Objective = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]  # (model, batch) -> scalar loss
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def shuffle_permutations(seed: int, n: int, batch_size: int, epochs: int) -> Tensor:
    """The per-epoch orders of a seeded shuffle of ``n`` examples: ``[epochs, n]``.

    Epoch e of a Lightning fit on ``DataLoader(range(n), batch_size=b, shuffle=True,
    generator=torch.Generator().manual_seed(seed))``, ``b = min(batch_size, n)``, visits
    positions ``out[e]`` in order; cutting a row into chunks of ``b`` gives its mini-batches.
    """
    generator = torch.Generator().manual_seed(seed)
    partial_last_batch = n % min(batch_size, n) != 0
    orders = []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed
        orders.append(torch.randperm(n, generator=generator))
        if partial_last_batch:  # the sampler is read to its end: one more, empty, draw
            torch.randperm(n, generator=generator)
    return torch.stack(orders)


def ensemble_batches(seeds: Sequence[int], subsets: Sequence[Tensor], batch_size: int,
                     epochs: int) -> list[Tensor]:
    """Training-set indices of every step of M seeded shuffles, one row per model.

    Args:
        seeds: ``[M]`` shuffle seeds (model m shuffles as ``lightning_fit(seed=seeds[m])``).
        subsets: ``M`` index tensors ``[n]`` into the training set, all of the same size.

    Returns:
        ``epochs × ceil(n / b)`` long tensors ``[M, b]`` (an epoch's last batch may be
        shorter), ``b = min(batch_size, n)``.
    """
    sizes = {len(s) for s in subsets}
    if len(seeds) != len(subsets) or len(sizes) != 1:
        raise ValueError("vectorised training needs one seed per subset and subsets of equal "
                         f"size, got {len(seeds)} seeds and sizes {sorted(sizes)}; fit such "
                         "models one by one instead.")
    n = sizes.pop()
    members = torch.stack([torch.as_tensor(s, dtype=torch.long) for s in subsets])  # [M, n]
    orders = torch.stack([shuffle_permutations(int(s), n, batch_size, epochs)
                          for s in seeds])  # [M, E, n]
    visits = members[:, None, :].expand_as(orders).gather(2, orders)  # [M, E, n]
    b = min(batch_size, n)
    return [chunk for e in range(epochs) for chunk in visits[:, e].split(b, dim=1)]


class _Steps:
    """A re-iterable list of ``[M, b]`` index tensors that Lightning treats as one loader."""

    def __init__(self, steps: list[Tensor]):
        self.steps = steps

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class _Objective(nn.Module):
    """Wraps ``objective(model, batch)`` as a module so ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: tuple[Tensor, ...]) -> Tensor:
        return self.objective(self.model, batch)


class EnsembleModule(L.LightningModule):
    """M copies of one architecture, stacked, trained on their own mini-batches.

    Args:
        models: ``M`` models of the same architecture (their initial weights).
        data: the training set; a ``TensorDataset`` whose tensors are ``[N, ...]``.
        objective: the per-model training loss ``objective(model, batch) -> scalar``, the
            same function the sequential module minimises.
        make_optimizer: builds the optimizer from a parameter list (the sequential module's
            optimizer, with the same hyperparameters); must act per coordinate.
    """

    def __init__(self, models: Sequence[nn.Module], data: TensorDataset, objective: Objective,
                 make_optimizer: OptimizerFactory):
        super().__init__()
        if not isinstance(data, TensorDataset):
            raise ValueError("vectorised training needs a TensorDataset; fit the models one "
                             "by one for other datasets.")
        params, buffers = stack_module_state(list(models))
        self.names = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[k]) for k in self.names])
        self.buffer_names = list(buffers)
        for i, k in enumerate(self.buffer_names):
            self.register_buffer(f"_b{i}", buffers[k])
        for i, t in enumerate(data.tensors):
            self.register_buffer(f"_data{i}", t, persistent=False)
        self.n_tensors = len(data.tensors)
        # A weightless (meta) copy to call with each model's weights; kept out of the module
        # tree so that device moves and precision casts leave it alone.
        self.__dict__["wrapper"] = _Objective(copy.deepcopy(models[0]).to("meta"), objective)
        self.make_optimizer = make_optimizer

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {f"model.{k}": p for k, p in zip(self.names, self.stacked, strict=True)}
        buffers = {f"model.{k}": getattr(self, f"_b{i}")
                   for i, k in enumerate(self.buffer_names)}
        return params, buffers

    def losses(self, indices: Tensor) -> Tensor:
        """``[M]``: each model's objective on its own batch (``indices [M, b]``)."""
        batch = tuple(getattr(self, f"_data{i}")[indices] for i in range(self.n_tensors))
        params, buffers = self._state()

        def one(p, b, x):
            return functional_call(self.wrapper, (p, b), (x,))

        return vmap(one)(params, buffers, batch)

    def training_step(self, indices: Tensor, batch_idx: int) -> Tensor:
        return self.losses(indices).sum()

    def configure_optimizers(self):
        return self.make_optimizer(list(self.stacked))

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copies model m's trained weights and buffers into ``models[m]``."""
        params, buffers = self._state()
        for m, model in enumerate(models):
            state = {k.removeprefix("model."): v[m].detach().clone()
                     for k, v in {**params, **buffers}.items()}
            model.load_state_dict(state)


def fit_ensemble(module: EnsembleModule, steps: list[Tensor], models: Sequence[nn.Module],
                 device: str = "cpu", precision: str = "32-true", progress: bool = False) -> None:
    """Trains ``module`` on ``steps`` (from :func:`ensemble_batches`) in one Lightning fit and
    writes the trained weights back into ``models`` (on CPU)."""
    device = resolve_device(device)
    trainer = L.Trainer(
        max_epochs=1, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
        precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False,
    )
    trainer.fit(module, _Steps(steps))
    module.cpu()
    module.write_back(models)
