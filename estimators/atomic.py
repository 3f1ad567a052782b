"""The verified cache format, shared by every on-disk cache (trained models, ground-truth
shards, EK-FAC factors, TrackStar's bases, gradient indexes) and by the run records.

* **Keys**: :func:`content_hash`, the one digest of what determines a file.
* **Atomic writes**: :func:`atomic_write` yields a hidden temp path beside the target
  (``.<name>.<host>.<pid>.<random>.tmp``), then fsyncs it, renames it into place
  (``os.replace`` is atomic on POSIX) and fsyncs the folder; a writer killed at any moment
  leaves only a temp file, which nothing reads and :func:`sweep_stale_temp_files` removes
  once its writer is gone (every writer sweeps its folder first).
* **Verified files**: every cached file carries its key, its *slot* (the units it holds:
  a shard's unit list, a model's seed, a factor pass, an index's rows) and a checksum of its
  contents, and a reader checks all three (:func:`load_checked`, :func:`load_array`). A file
  that cannot be read, holds another key or slot, or fails its checksum is logged with a
  one-line reason, removed and reported missing, so the caller recomputes it. Torch payloads
  (:func:`save_checked`) are ``torch.save``\ d through an open file (no temp name inside the
  zip records, and no second copy of the payload in memory), so their bytes depend only on
  their content: a recomputed file is byte-identical. Arrays (:func:`array_writer`) stay
  plain ``.npy`` files, memory-mappable by numpy, with the same three fields in a trailer
  after the data.

This module lives in ``estimators`` because estimators may not import ``bench``; ``bench``
uses it too.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

HOST = socket.gethostname().split(".")[0] or "host"
SEAL = ("key", "slot", "checksum")  # the fields a verified torch payload carries
TRAILER = b"TDAMETA1"  # ends a verified array file: <json> <len: 8 bytes> TRAILER


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
        return {"tensor": hashlib.sha256(data).hexdigest(), "dtype": str(value.dtype),
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
    """Yields a temp path to write; on success it is fsynced and replaces ``path`` (and the
    folder is fsynced), on any error (or interruption) it is deleted and ``path`` is
    untouched. Stale temp files of dead writers in the folder are swept first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_files(path.parent)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flushes a file's (or a folder's) data to disk; a folder that cannot be opened is
    skipped (some file systems do not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if not path.is_dir():
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def write_with(path: Path, fill: Callable[[BinaryIO], Any]) -> None:
    """Writes ``path`` atomically with ``fill(file)``: the writer of every torch payload,
    record and text file (arrays stream through :func:`array_writer`)."""
    with atomic_write(Path(path)) as tmp, open(tmp, "wb") as f:
        fill(f)


def write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    write_with(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode())


def sweep_stale_temp_files(directory: Path, recursive: bool = False) -> int:
    """Removes temp files left by writers on this host that died (their PID is gone).

    Temp files of other hosts (a shared cache on a cluster) are left to their own hosts.

    Returns:
        the number of files removed.
    """
    directory = Path(directory)
    removed = 0
    if not directory.is_dir():
        return 0
    for tmp in (directory.rglob if recursive else directory.glob)(".*.tmp"):
        parts = tmp.name.rsplit(".", 4)
        host, pid = (parts[1], parts[2]) if len(parts) == 5 else ("", "")
        if host == HOST and pid.isdigit() and not _alive(int(pid)):
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


# ---- verified torch payloads --------------------------------------------------------------

def checksum(payload: dict[str, Any]) -> str:
    """The digest of a payload's contents (every field but the seal), tensors by their bytes."""
    return content_hash({k: v for k, v in payload.items() if k not in SEAL}, length=32)


def payload_bytes(payload: dict[str, Any]) -> bytes:
    """``torch.save`` of ``payload`` as bytes that depend only on its content."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _plain(slot: Any) -> Any:
    """A slot as it reads back from a file (tuples as lists, tensors as lists)."""
    if isinstance(slot, torch.Tensor):
        slot = slot.tolist()
    return json.loads(json.dumps(slot))


def save_checked(payload: dict[str, Any], path: Path, slot: Any = None) -> None:
    """Writes ``payload`` (which holds its ``key``) to ``path`` as a verified file: sealed
    with ``slot`` (JSON-like: the units it holds) and the checksum, atomically, with bytes
    that depend only on the content."""
    if "key" not in payload:
        raise ValueError("a cache payload must hold its key")
    sealed = {**payload, "slot": _plain(slot)}
    sealed["checksum"] = checksum(sealed)
    write_with(path, lambda f: torch.save(sealed, f))  # streamed: no copy in a buffer


def load_checked(path: Path, key: str, slot: Any = None) -> dict[str, Any] | None:
    """The payload of the verified file ``path`` if it exists, carries ``key`` (and
    ``slot``, when given) and passes its checksum; else None (a bad file is logged with the
    reason, removed, and the caller recomputes it)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is treated the same way
        return _reject(path, stat, _unreadable(path, stat, err))
    reason = check_payload(payload, key, slot)
    return payload if reason is None else _reject(path, stat, reason)


def check_payload(payload: Any, key: str, slot: Any = None) -> str | None:
    """Why ``payload`` is not the verified file for ``key`` and ``slot`` (None: it is)."""
    if not isinstance(payload, dict) or "key" not in payload:
        return "is not a tda-bench cache file (no key)"
    if payload["key"] != key:
        return f"holds key {payload['key']!r}, not {key!r}"
    if "checksum" not in payload:
        return "has no checksum (written by an older tda-bench)"
    if slot is not None and payload.get("slot") != _plain(slot):
        return (f"holds slot {_short(payload.get('slot'))} where {_short(_plain(slot))} "
                "belongs (copied from another slot?)")
    if checksum(payload) != payload["checksum"]:
        return "fails its checksum (its contents changed after it was written)"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unreadable(path: Path, stat: os.stat_result, err: BaseException) -> str:
    if stat.st_size == 0:
        return "is empty"
    return f"cannot be read ({type(err).__name__}: truncated, or not a torch file)"


def _reject(path: Path, stat: os.stat_result, reason: str) -> None:
    """Logs why ``path`` is not used and removes it, unless another writer has replaced it
    meanwhile (then the new file is left for its readers)."""
    log.warning("Cache file %s %s; recomputing it.", path, reason)
    try:
        if os.stat(path).st_ino == stat.st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    return None


# ---- verified arrays (gradient indexes) ---------------------------------------------------

@contextmanager
def array_writer(path: Path, key: str, slot: Any, shape: tuple[int, ...],
                 dtype: np.dtype | type = np.float32) -> Iterator[np.ndarray]:
    """Yields a writable memory map ``shape`` of a new ``.npy`` file; on success its
    checksum, key and slot are appended as a trailer and the file replaces ``path``
    atomically (nothing is left on error)."""
    with atomic_write(Path(path)) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        yield out
        out.flush()
        offset = out.offset
        del out
        meta = {"key": key, "slot": _plain(slot), "shape": list(shape),
                "dtype": np.dtype(dtype).str, "checksum": _file_digest(tmp, offset)}
        text = json.dumps(meta, sort_keys=True).encode()
        with open(tmp, "ab") as f:
            f.write(text + struct.pack("<Q", len(text)) + TRAILER)


def load_array(path: Path, key: str, slot: Any, shape: tuple[int, ...],
               dtype: np.dtype | type = np.float32) -> np.ndarray | None:
    """The read-only memory map of the verified array ``path`` if it exists and carries
    ``key``, ``slot``, ``shape`` and ``dtype`` and passes its checksum; else None (a bad
    file is logged with the reason and removed)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    try:
        array = np.load(path, mmap_mode="r")
        meta = _trailer(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is treated the same way
        return _reject(path, stat, _unreadable(path, stat, err).replace("a torch", "an npy"))
    expected = {"key": key, "slot": _plain(slot), "shape": list(shape),
                "dtype": np.dtype(dtype).str}
    if meta is None:
        return _reject(path, stat, "has no checksum (written by an older tda-bench)")
    for field, value in expected.items():
        if meta.get(field) != value:
            return _reject(path, stat, f"holds {field} {_short(meta.get(field))}, not "
                                       f"{_short(value)}")
    if list(array.shape) != list(shape) or \
            _file_digest(path, array.offset, array.nbytes) != meta["checksum"]:
        return _reject(path, stat, "fails its checksum (its contents changed after it was "
                                   "written)")
    return array


def _trailer(path: Path) -> dict | None:
    """The metadata trailer of a verified array file, or None if it has none."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 16:
            return None
        f.seek(size - 16)
        end = f.read(16)
        if end[8:] != TRAILER:
            return None
        length = struct.unpack("<Q", end[:8])[0]
        f.seek(size - 16 - length)
        return json.loads(f.read(length))


def _file_digest(path: Path, offset: int, nbytes: int | None = None) -> str:
    """SHA-256 of ``nbytes`` bytes of ``path`` from ``offset`` (to the end if None)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = nbytes
        while remaining is None or remaining > 0:
            block = f.read(1 << 22 if remaining is None else min(1 << 22, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()[:32]
