"""The on-disk cache of the harness: the verified format of :mod:`estimators.atomic`
(content-addressed keys, atomic fsynced writes with deterministic bytes, files that carry
their key, slot and checksum and are verified on load) plus the locks that let concurrent
jobs compute a file once.

Everything expensive (trained models, ground-truth shards) is stored under ``cache_dir`` by
a key that hashes everything that determines it (:func:`content_hash`), written with
:func:`save_atomic` and read with :func:`load_checked`, which logs a one-line reason,
removes a file that cannot be read or does not match (another key, another slot, a failed
checksum) and reports it missing, so it is recomputed. :func:`cache_lock` (an advisory
``flock`` on a hidden ``.<name>.lock`` beside the target) lets concurrent jobs that need the
same file compute it once; the kernel drops the lock when its holder dies, so a killed job
never blocks the rerun.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from estimators.atomic import HOST, save_checked
from estimators.atomic import content_hash as content_hash  # re-exported for bench
from estimators.atomic import load_checked as load_checked  # re-exported for bench
from estimators.atomic import payload_bytes as payload_bytes  # re-exported for bench
from estimators.atomic import sweep_stale_temp_files as sweep_stale_temp_files  # re-exported

log = logging.getLogger(__name__)
_HOST = HOST  # temp files name their writer's host (estimators.atomic)


def save_atomic(payload: dict[str, Any], path: Path, slot: Any = None) -> None:
    """Writes ``payload`` (with its ``key``) to ``path`` as a verified cache file holding
    ``slot`` (:func:`estimators.atomic.save_checked`)."""
    save_checked(payload, path, slot)


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
