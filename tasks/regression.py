"""``regression``: scikit-learn's bundled diabetes data (442 patients, 10 features; no
download) with an MLP regressor, or, as ``regression_linear``, a linear model.

Features and target are standardised with the training split's mean and standard deviation.
The model predicts ŷ ``[B, 1]``; the training loss of an example is ½(ŷ − y)² (the negative
log-likelihood of N(ŷ, 1) up to a constant, so the Gauss-Newton matrix is JᵀJ and the true
Fisher samples targets ŷ + ε, ε ~ N(0, 1)); the measurement of a query is the negative
squared error −(ŷ − y)² (higher is better), as in Grosse et al. 2023's UCI regression
experiments.

``model: mlp`` (ReLU, ``hidden`` widths) trains with SGD (float32) and is not convex: LDS and
PBRF. ``model: linear`` is ridge regression trained to convergence in float64 by full-batch
L-BFGS: convex, so leave-one-out retraining is well defined (LOO, LDS with one seed, PBRF).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tasks.supervised import SupervisedTask, relu_mlp

N_DIABETES = 442
MODELS = ("mlp", "linear")


def load_diabetes_split(n_train: int, n_queries: int, split_seed: int,
                        dtype: torch.dtype) -> tuple[TensorDataset, TensorDataset]:
    """A seeded split into training and query sets, standardised by the training split."""
    from sklearn.datasets import load_diabetes

    if n_train + n_queries > N_DIABETES or min(n_train, n_queries) < 2:
        raise ValueError(f"task.n_train + task.n_queries must be at most {N_DIABETES} (each at "
                         f"least 2), got {n_train} + {n_queries}")
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)
    perm = torch.randperm(N_DIABETES, generator=torch.Generator().manual_seed(split_seed))
    train, queries = perm[:n_train], perm[n_train:n_train + n_queries]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    y = (y - y[train].mean()) / y[train].std()
    return (TensorDataset(x[train].to(dtype), y[train].to(dtype)),
            TensorDataset(x[queries].to(dtype), y[queries].to(dtype)))


def half_squared_error(outputs: Tensor, batch) -> Tensor:
    """``[B]``: ½(ŷ − y)², the per-example training loss."""
    return 0.5 * (outputs[:, 0] - batch[1]).pow(2)


def negative_squared_error(outputs: Tensor, batch) -> Tensor:
    """``[B]``: −(ŷ − y)², the query measurement (higher is better)."""
    return -(outputs[:, 0] - batch[1]).pow(2)


def sample_gaussian(outputs: Tensor, batch, generator: torch.Generator):
    """The batch with targets drawn from N(ŷ, 1) (the true Fisher of the loss)."""
    noise = torch.randn(outputs.shape[0], generator=generator, dtype=torch.float64)
    return (batch[0], outputs[:, 0].detach() + noise.to(outputs))


class Regression(SupervisedTask):
    """An MLP or linear regressor on the diabetes data (see module docstring).

    Args:
        n_train: training examples (of 442).
        n_queries: held-out queries.
        model: ``mlp`` or ``linear``.
        hidden: hidden widths of the MLP.
        **task: ``l2``, ``batch_size``, ``epochs``, ``optim``, ``checkpoints``
            (:class:`~tasks.supervised.SupervisedTask`), ``split_seed``, ground-truth settings,
            ``device`` (:class:`~tasks.base.Task`). For ``linear`` the batch is the whole
            training set and ``epochs`` counts L-BFGS calls.
    """

    VERSION = 1
    loss = staticmethod(half_squared_error)
    measure = staticmethod(negative_squared_error)
    sample_targets = staticmethod(sample_gaussian)

    def __init__(self, n_train: int = 350, n_queries: int = 92, model: str = "mlp",
                 hidden: list[int] | tuple[int, ...] = (32,), **task):
        if model not in MODELS:
            raise ValueError(f"task.model must be one of {', '.join(MODELS)}, got {model!r}")
        self.model_kind = model
        self.convex = model == "linear"
        if self.convex:  # ridge regression to convergence, as digits_logreg
            self.dtype, self.optimizer, self.precision = torch.float64, "lbfgs", "64-true"
            task.setdefault("batch_size", 100_000)
        super().__init__(**task)
        self.hidden = [int(h) for h in hidden]
        self.train_set, self.query_set = load_diabetes_split(n_train, n_queries,
                                                             self.split_seed, self.dtype)

    def build_model(self, seed: int) -> nn.Module:
        return relu_mlp([10, *([] if self.convex else self.hidden), 1], seed, self.dtype)
