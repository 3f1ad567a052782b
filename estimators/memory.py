"""The memory model: how much a run may use, and what each part of attribution costs.

``memory_budget_mb`` bounds every stage of a gradient estimator: the factor passes, the
query gradients, the scoring chunks and the index building. Its default (``null``) is a safe
fraction of what the device has when the run starts: ``CPU_FRACTION`` of the memory the
kernel reports available (``MemAvailable``), capped by a SLURM job's ``--mem`` and the
cgroup's limit; on ``cuda``, ``GPU_FRACTION`` of the GPU's free memory.

The budget is for what attribution allocates beyond the process's *baseline*: Python,
torch, transformers and the data, resident before the fit starts (about 0.5–0.8 GB for
hf_lm runs; ``MemAvailable`` already excludes it). Planning depends only on the budget and
the shapes, never on the measured resident memory, so jobs of one sharded split choose the
same blocks and chunks. The harness hands back what was freed (:func:`release`) before the
fit, between fit and score and after the query gradients are stored, and records the
baseline as ``baseline_rss_mb``: a run's ``peak_rss_mb`` stays within baseline + budget
(``studies/perf/lm_scale.py`` measures both).

Each stage splits its needs into a *fixed* part (the model, fitted factors, the stored query
gradients, the score matrix) and a *per-example* part (activations kept for the backward
pass, measured once with a probe, plus the stage's own per-layer buffers) and takes as many
examples per batch as fit (:meth:`Budget.batch`). A setting whose fixed part, or a single
example, does not fit is refused before anything large is allocated, in one sentence that
names the key to change. Sizes are counted in bytes; messages speak MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CPU_FRACTION = 0.3  # of MemAvailable: leaves room for other processes and Python itself
GPU_FRACTION = 0.8  # of the GPU's free memory: leaves room for the allocator's fragmentation
BACKWARD_FACTOR = 2.0  # the backward pass holds about as much again as the saved activations
MB = 2**20


def _meminfo_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def _cgroup_limit() -> float | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return float(text)
    return None


def _slurm_limit() -> float | None:
    """A SLURM job's memory (``--mem`` or ``--mem-per-cpu`` × CPUs), in bytes."""
    per_node = os.environ.get("SLURM_MEM_PER_NODE")
    if per_node and per_node.isdigit():
        return int(per_node) * MB
    per_cpu, cpus = os.environ.get("SLURM_MEM_PER_CPU"), os.environ.get("SLURM_CPUS_ON_NODE")
    if per_cpu and per_cpu.isdigit() and cpus and cpus.isdigit():
        return int(per_cpu) * int(cpus) * MB
    return None


def available_bytes(device: torch.device | str = "cpu") -> float:
    """What the device can give this process now: free GPU memory on ``cuda``, else the
    smallest of ``MemAvailable``, the SLURM job's memory and the cgroup's limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    limits = [v for v in (_meminfo_available(), _slurm_limit(), _cgroup_limit()) if v]
    return min(limits) if limits else 8.0 * 2**30


def default_budget_mb(device: torch.device | str = "cpu") -> float:
    """The default ``memory_budget_mb``: a safe fraction of :func:`available_bytes`."""
    fraction = GPU_FRACTION if torch.device(device).type == "cuda" else CPU_FRACTION
    return fraction * available_bytes(device) / MB


def status_bytes(key: str) -> float | None:
    """A size from the kernel's account of this process (``/proc/self/status``, Linux):
    ``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - no C library to load
        return None


_LIBC = _libc()


def release(device: torch.device | str = "cpu") -> None:
    """Returns the memory earlier stages freed to the system (a garbage collection, glibc's
    ``malloc_trim``, torch's CUDA cache), so that the resident memory is what is still held
    and the next stage can have the rest. Freed tensors otherwise stay in glibc's heap,
    fragmented between the blocks still in use: building 600 MB of query factors left
    RSS 1.1 GB higher, and trimming gave back 650 MB of it."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def mb(nbytes: float) -> str:
    value = nbytes / MB
    return f"{value:,.0f} MB" if value >= 100 else f"{value:.2g} MB"


def tensor_bytes(*shape: int, dtype: torch.dtype = torch.float32) -> float:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    size = 1
    for s in shape:
        size *= int(s)
    return float(size * torch.empty((), dtype=dtype).element_size())


def parameter_bytes(model: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


@dataclass(frozen=True)
class Budget:
    """A memory budget and the sentence that names it.

    Args:
        total_mb: the budget in MiB (``memory_budget_mb``).
        source: how it was set, for messages (``memory_budget_mb=...`` or the default).
    """

    total_mb: float
    source: str = "memory_budget_mb"

    @property
    def total(self) -> float:
        return self.total_mb * MB

    def check(self, fixed: dict[str, float], stage: str, hint: str) -> float:
        """Refuses when the ``fixed`` parts (``{what: bytes}``) exceed the budget; returns
        what is left for batches."""
        used = sum(fixed.values())
        if used > self.total:
            parts = ", ".join(f"{k} {mb(v)}" for k, v in fixed.items() if v > 0)
            raise ValueError(f"{stage} needs {mb(used)} before its first batch ({parts}), above "
                             f"{self.source} ({mb(self.total)}): {hint}.")
        return self.total - used

    def batch(self, fixed: dict[str, float], per_example: float, largest: int, stage: str,
              key: str, hint: str) -> int:
        """The most examples per batch, at most ``largest``, whose ``per_example`` bytes fit
        beside the ``fixed`` parts; refuses (naming ``key`` and ``hint``) when none does."""
        left = self.check(fixed, stage, hint)
        fits = int(left // max(per_example, 1.0))
        if fits < 1:
            raise ValueError(f"{stage} needs {mb(per_example)} per example beyond its fixed "
                             f"{mb(sum(fixed.values()))}, and {self.source} "
                             f"({mb(self.total)}) leaves {mb(left)}: {hint} (one "
                             f"example per {key} is already the least).")
        return max(1, min(int(largest), fits))


def budget(memory_budget_mb: float | None, device: torch.device | str = "cpu") -> Budget:
    """The run's :class:`Budget`: ``memory_budget_mb`` if set, else the default."""
    if memory_budget_mb is None:
        cuda = torch.device(device).type == "cuda"
        fraction = GPU_FRACTION if cuda else CPU_FRACTION
        return Budget(default_budget_mb(device), f"the default memory budget ({fraction:.0%} "
                      "of available memory; set memory_budget_mb)")
    from estimators.options import positive

    return Budget(positive("memory_budget_mb", memory_budget_mb), "memory_budget_mb")


class SavedBytes:
    """Counts the bytes autograd saves for the backward pass (distinct storages, parameters
    excluded): ``with SavedBytes(model) as saved: loss = f(...)``; then ``saved.total``."""

    def __init__(self, model: nn.Module):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.total = 0.0
        self._hooks = None

    def _pack(self, tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.skip and ptr not in self.seen:
                self.seen.add(ptr)
                self.total += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - e.g. sparse tensors
            pass
        return tensor

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
