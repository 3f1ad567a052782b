"""The on-disk cache: content-addressed keys (:func:`content_hash`), atomic writes, checked reads.

Everything expensive (trained models, ground-truth shards) is stored under ``cache_dir``
by a key that hashes everything that determines it. Files are written to a hidden temporary
name beside the target and renamed into place (``os.replace`` is atomic on POSIX), so a
reader never sees half a file and an interrupted writer leaves only a temp file, which is
ignored and later swept. Each payload stores its own key; a file that fails to load or
carries another key is reported, deleted and recomputed.

The bytes of a file depend only on its payload (``torch.save`` to a buffer: the zip records
are not named after the temp file), so a result recomputed after a crash is byte-identical.
:func:`cache_lock` (an advisory ``flock`` on a hidden ``.<name>.lock`` beside the target)
lets concurrent jobs that need the same file compute it once; the kernel drops the lock when
its holder dies, so a killed job never blocks the rerun.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from estimators.atomic import HOST, atomic_write
from estimators.atomic import content_hash as content_hash  # re-exported for bench
from estimators.atomic import load_checked as load_checked  # re-exported for bench

log = logging.getLogger(__name__)
_HOST = HOST  # temp files name their writer's host (estimators.atomic)


def payload_bytes(payload: dict[str, Any]) -> bytes:
    """``torch.save`` of ``payload`` as bytes that depend only on its content."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Writes ``payload`` with ``torch.save`` to ``path`` atomically (deterministic bytes)."""
    data = payload_bytes(payload)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def lock_path(path: Path) -> Path:
    """The hidden lock file that guards the computation of ``path``."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def cache_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Holds an exclusive advisory lock for computing ``path``; yields whether it was acquired.

    With ``blocking=False`` it yields False at once if another process holds the lock. The
    lock file itself is left in place (removing it would race with a waiting process).
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def sweep_stale_temp_files(directory: Path) -> int:
    """Removes temp files left by writers on this host that died (their PID is gone).

    Temp files of other hosts (a shared cache on a cluster) are left to their own hosts.

    Returns:
        the number of files removed.
    """
    removed = 0
    for tmp in directory.glob(".*.tmp") if directory.exists() else []:
        parts = tmp.name.rsplit(".", 4)
        host, pid = (parts[1], parts[2]) if len(parts) == 5 else ("", "")
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
