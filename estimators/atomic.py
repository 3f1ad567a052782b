"""Cache plumbing shared by every on-disk cache (ground truth, models, factors, gradient
indexes): the one content hash that keys them, atomic writes (write beside the target under
a hidden temp name, then rename into place), and checked reads (only a file that loads and
carries its key).

``os.replace`` is atomic on POSIX, so a reader never sees half a file and a writer killed at
any moment leaves only a temp file ``.<name>.<host>.<pid>.<random>.tmp``, which nothing reads
and :func:`bench.cache.sweep_stale_temp_files` removes once its writer is gone. This module
lives in ``estimators`` because estimators may not import ``bench``; ``bench`` uses it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

HOST = socket.gethostname().split(".")[0] or "host"


def content_hash(value: Any, length: int = 16) -> str:
    """A stable hex digest of ``value``: the key of every cache file.

    ``value`` is any JSON-like structure (dicts, lists, numbers, strings; dict keys sorted)
    whose leaves may also be tensors, numpy arrays or modules, which enter by their dtype,
    shape and bytes (a module by its ``state_dict``). For plain JSON the digest is the
    SHA-256 of the canonical JSON text, so keys stay stable across releases.
    """
    text = json.dumps(_canonical(value), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _canonical(value: Any) -> Any:
    """``value`` with tensors, arrays and modules replaced by digests of their contents."""
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        data = value.view(-1).view(torch.uint8).numpy() if value.numel() else b""
        return {"tensor": hashlib.sha256(bytes(data)).hexdigest(), "dtype": str(value.dtype),
                "shape": list(value.shape)}
    if isinstance(value, np.ndarray):
        return _canonical(torch.from_numpy(np.ascontiguousarray(value)))
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


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
