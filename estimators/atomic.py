"""Atomic file writes and checked reads, shared by every on-disk cache (ground truth,
models, factors, gradient indexes): write beside the target under a hidden temp name, then
rename into place; read back only a file that loads and carries its key.

``os.replace`` is atomic on POSIX, so a reader never sees half a file and a writer killed at
any moment leaves only a temp file ``.<name>.<host>.<pid>.<random>.tmp``, which nothing reads
and :func:`bench.cache.sweep_stale_temp_files` removes once its writer is gone. This module
lives in ``estimators`` because estimators may not import ``bench``; ``bench`` uses it too.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HOST = socket.gethostname().split(".")[0] or "host"


def temp_path(path: Path) -> Path:
    """The hidden temp name a writer of ``path`` uses (host and PID, for stale sweeps)."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yields a temp path to write; on success it replaces ``path``, on any error (or
    interruption) it is deleted and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checked(path: Path, key: str) -> dict[str, Any] | None:
    """Loads a ``torch.save`` payload written atomically if it exists and carries ``key``.

    A corrupt or foreign file is logged, removed, and reported as missing (None).
    """
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("key") != key:
            raise ValueError(f"key mismatch (expected {key})")
        return payload
    except Exception as err:  # noqa: BLE001 - any unreadable file is treated the same way
        log.warning("Cache file %s is corrupt (%s); deleting it and recomputing.", path, err)
        path.unlink(missing_ok=True)
        return None
