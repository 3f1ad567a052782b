"""scikit-learn's bundled digits (8×8 images, 10 classes; no download), shared by the
``digits_logreg``, ``digits_mlp`` and ``digits_cnn`` tasks.

Batches are ``(x [B, 64], y [B])`` (a CNN reshapes them to ``[B, 1, 8, 8]`` itself). The
training loss is the per-example cross entropy (never the L2 term, which enters the curvature
as λ₂I); the measurement is the margin ``logit_y − logsumexp_{c≠y} logit_c`` (higher is
better); training and retraining are :class:`~tasks.supervised.SupervisedTask`'s.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from estimators.options import OptionError, positive
from tasks.supervised import (  # noqa: F401 - re-exported for the digits tasks' users
    SupervisedTask,
    logits_of,
    margin,
    per_example_ce,
    sample_labels,
)

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


class DigitsTask(SupervisedTask):
    """The digits split and a classifier trained on it.

    Args:
        n_train: training examples (about 1,000).
        n_queries: held-out query examples (about 100).
        **task: ``l2``, ``batch_size``, ``epochs``, ``optim``, ``checkpoints``
            (:class:`~tasks.supervised.SupervisedTask`), ``split_seed``, ground-truth settings,
            ``device`` (:class:`~tasks.base.Task`).
    """

    def __init__(self, n_train: int = 1000, n_queries: int = 100, **task):
        super().__init__(**task)
        n_train = positive("n_train", n_train, integer=True)
        n_queries = positive("n_queries", n_queries, integer=True)
        self.train_set, self.query_set = load_digits_split(n_train, n_queries, self.split_seed,
                                                           self.dtype)
