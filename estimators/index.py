"""Gradient indexes on disk: projected training gradients saved once, memory-mapped after.

An index is one ``[n_train, d]`` float32 ``.npy`` file named by a key that hashes everything
that determines its numbers: a fingerprint of the model's tracked parameters and of the
training data, the projection, the layer filter and which function was differentiated. It is
a verified cache file (:func:`estimators.atomic.array_writer`): written under a hidden
temporary name and renamed into place (atomic on POSIX), so a reader never sees half an
index, with its key, slot (its rows) and checksum in a trailer that numpy ignores; a file
that cannot be read or does not match is deleted and rebuilt. Scoring new queries
against a stored index costs only the queries' own gradients.

This module is independent of ``bench`` (estimators never import it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from estimators.atomic import array_writer, content_hash, load_array
from estimators.gradients import GradientEngine
from estimators.problem import AttributionProblem

log = logging.getLogger(__name__)


def fingerprint(problem: AttributionProblem, engine: GradientEngine, spec: dict) -> str:
    """A hex key of the tracked parameters, the training data and ``spec``.

    The data part hashes the problem's ``key``, ``n_train`` and the first collated batch of
    up to 64 training examples (the whole set is not read).
    """
    return content_hash({"parameters": engine.parameters(), "problem": problem.key,
                         "n_train": problem.n_train, "layers": engine.names,
                         "first_batch": next(iter(problem.loader("train", 64))), "spec": spec},
                        length=20)


class GradientIndex:
    """A directory of ``[n, d]`` float32 gradient matrices, one ``<key>.npy`` each.

    Args:
        directory: where the indexes live (created on first write).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def load(self, key: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The memory-mapped index ``[n, d]`` for ``key``, or None if absent or it fails
        verification (then it is deleted, with the reason logged)."""
        return load_array(self.path(key), key, {"rows": int(shape[0])}, shape, np.float32)

    def build(self, key: str, shape: tuple[int, int],
              chunks: Iterator[tuple[slice, Tensor]]) -> np.ndarray:
        """Writes the rows ``chunks`` yields (``(rows, [B, d])``) atomically; returns the map."""
        path = self.path(key)
        with array_writer(path, key, {"rows": int(shape[0])}, shape, np.float32) as out:
            written = 0
            for rows, values in chunks:
                out[rows] = values.detach().to(torch.float32).cpu().numpy()
                written = rows.stop
            if written != shape[0]:
                raise RuntimeError(f"index got {written} rows, expected {shape[0]}")
        return np.load(path, mmap_mode="r")

    def load_or_build(self, key: str, shape: tuple[int, int],
                      chunks: Iterator[tuple[slice, Tensor]]) -> np.ndarray:
        """The index for ``key``: memory-mapped from disk, or built from ``chunks`` first."""
        array = self.load(key, shape)
        if array is None:
            array = self.build(key, shape, chunks)
        return array


def read_rows(array: np.ndarray, chunk_size: int) -> Iterator[tuple[slice, Tensor]]:
    """Streams a (memory-mapped) ``[n, d]`` array as ``(rows, [B, d] float32 tensor)``."""
    for start in range(0, array.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, array.shape[0]))
        yield rows, torch.from_numpy(np.array(array[rows]))
