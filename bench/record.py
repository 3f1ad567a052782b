"""Run records: ``metrics.json``, ``per_query.csv`` and ``scores.pt`` in the run directory.

``metrics.json`` holds the metrics under stable keys (``lds``, ``lds_sem``, ``loo_pearson``,
``loo_spearman``, ``fit_seconds``, ``score_seconds``, ``peak_rss_mb``, ...), the run's
identity (``task``, ``estimator``, ``seed``) and its provenance (command, date, package
versions, commit), so that a leaderboard row can say exactly where it came from. Every record
file is written atomically (:mod:`estimators.atomic`: a temp file, fsynced, renamed into
place), so a job killed while recording leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import resource
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from estimators.atomic import payload_bytes, write_bytes, write_text
from estimators.memory import MB, status_bytes

PACKAGES = ("tda-bench", "torch", "lightning", "hydra-core", "transformers", "wandb", "scipy",
            "numpy", "pandas", "scikit-learn", "bm25s")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux ≥ 4.0), so that
    :func:`peak_rss_mb` measures one run even when a multirun shares the process.

    Returns:
        whether the reset worked (elsewhere the peak is the process's lifetime peak).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory in MiB since the last :func:`reset_peak_rss` (VmHWM), else the
    process's lifetime peak."""
    peak = status_bytes("VmHWM")
    if peak is not None:
        return peak / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def versions() -> dict[str, str]:
    """Installed versions of the packages that determine results."""
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def commit() -> str:
    """The git commit of the tda-bench source tree (``+dirty`` with local changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty.strip() else "")


def provenance(command: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {"command": command, "date": now, "versions": versions(), "commit": commit()}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_records(out_dir: Path, record: dict[str, Any], per_query: dict[str, np.ndarray],
                  scores: torch.Tensor | None) -> None:
    """Writes ``scores.pt``, ``per_query.csv`` (one row per query) and, last, ``metrics.json``
    (the file the leaderboard looks for), each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        write_bytes(out_dir / "scores.pt", payload_bytes(scores))
    if per_query:
        frame = pd.DataFrame(per_query)
        frame.insert(0, "query", np.arange(len(frame)))
        write_text(out_dir / "per_query.csv", frame.to_csv(index=False))
    text = json.dumps({k: _clean(v) for k, v in record.items()}, indent=2, sort_keys=True)
    write_text(out_dir / "metrics.json", text + "\n")


def write_layer_scores(out_dir: Path, estimator: Any, problem: Any) -> None:
    """Writes ``layer_scores.pt``: an estimator's layer-wise scores, for the layer-share plot.

    The file holds ``layer_scores [L, Q, N]`` (float32), ``layers`` (L names: the estimator's
    ``layer_names`` or the tracked linear layers of its ``modules``) and ``query_types``
    (Q labels: each query's group in ``problem.query_groups``, or None without groups).
    """
    from estimators.gradients import tracked_layers

    layer_scores = estimator.layer_scores.detach().float().cpu()
    names = getattr(estimator, "layer_names", None)
    if names is None:
        names = [layer.name for layer in tracked_layers(problem.model,
                                                        getattr(estimator, "modules", None))]
    if len(names) != layer_scores.shape[0]:
        names = [f"layer{i}" for i in range(layer_scores.shape[0])]
    types = problem.query_group_of() if problem.query_groups else None
    write_bytes(out_dir / "layer_scores.pt", payload_bytes(
        {"layer_scores": layer_scores, "layers": list(names), "query_types": types}))


ARCHIVED = ("metrics.json", "per_query.csv", "error.json")  # not scores.pt: large, rebuildable


def archive(directories: list[Path], dest: Path) -> int:
    """Copies the run records under ``directories`` into ``dest`` (for committing them).

    Keeps :data:`ARCHIVED` files only, at ``dest/<directory name>/<path inside it>``, so a
    leaderboard built from ``dest`` equals one built from the originals. Returns the number
    of run folders copied.
    """
    copied = set()
    for directory in map(Path, directories):
        for name in ARCHIVED:
            for path in sorted(directory.rglob(name)):
                target = dest / directory.name / path.relative_to(directory)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                copied.add(target.parent)
    return len(copied)


def read_errors(directories: list[Path]) -> pd.DataFrame:
    """The jobs that left ``error.json`` instead of a record (refused or skipped pairs):
    columns ``task, estimator, seeds, error``, one row per distinct reason."""
    rows = []
    for path in (p for d in directories for p in sorted(Path(d).rglob("error.json"))):
        try:
            row = json.loads(path.read_text())
            if not isinstance(row, dict) or "error" not in row:
                raise ValueError("not an error record")
        except (OSError, ValueError) as err:
            print(f"tda-bench-leaderboard: warning: skipping {path}: {err}", file=sys.stderr)
            continue
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["task", "estimator", "seed", "error"])
    if frame.empty:
        return frame.rename(columns={"seed": "seeds"})
    frame["error"] = frame["error"].astype(str).str.replace(r"\s+", " ", regex=True)
    grouped = frame.groupby(["task", "estimator", "error"], sort=True)["seed"]
    return grouped.apply(lambda s: ",".join(map(str, sorted(set(s))))).reset_index().rename(
        columns={"seed": "seeds"})[["task", "estimator", "seeds", "error"]]
