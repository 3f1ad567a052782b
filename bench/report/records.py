"""Run records for the leaderboard: find ``metrics.json`` + ``per_query.csv`` under folders,
label each run by task and estimator (with their config overrides), and read a metric's
per-seed value and per-query values ``[Q]``.

A row is an estimator plus its ``estimator.*`` overrides (``ekfac[damping=0.01]``; not
``per_layer`` or ``chunk_size``, which leave the scores unchanged); a task column is a task,
labelled with its ``task.*`` overrides only when one task name was run with several. Records
of the same row, task and seed after the first (by date, then path) are ignored with a
warning. A record that cannot be read (not JSON, not an object, no task, estimator or seed, a
seed that is not an integer, a value that is not a number, an unreadable ``per_query.csv``)
is reported with its path and the reason and skipped, or with ``strict`` refused.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.metrics import baseline_of, is_cost, is_headline
from bench.metrics.registry import role_of
from bench.report import tables as render

# Per-query columns named differently from their record key.
COLUMN_ALIASES = {"mrr": "rr"}


# Estimator overrides that change cost but not scores: they do not make a separate row.
SAME_SCORES = ("estimator.per_layer", "estimator.chunk_size")


@dataclass
class Run:
    """One run record: ``metrics.json`` and its per-query table ``[Q, metrics]``."""

    path: Path
    record: dict[str, Any]
    per_query: pd.DataFrame | None
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.record["seed"])


def parse_overrides(command: str) -> dict[str, str]:
    """``"tda-bench -m task=a seed=0,1"`` -> ``{"task": "a", "seed": "0,1"}``."""
    out: dict[str, str] = {}
    for token in shlex.split(command or "")[1:]:
        if "=" in token and not token.startswith("-"):
            key, value = token.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def _canonical(value: str) -> str:
    """One spelling per YAML constant (a sweep writes ``True``, a user types ``true``);
    strings such as ``none`` (an option's name) are left alone."""
    lowered = value.lower()
    return "null" if lowered == "~" else lowered if lowered in ("true", "false", "null") else value


def _variant(name: str, overrides: dict[str, str], group: str) -> str:
    """``name[k=v,...]`` from the ``{group}.*`` overrides (``name`` when there are none),
    leaving out the :data:`SAME_SCORES` keys; booleans and null spelled in lower case."""
    extra = sorted((k[len(group) + 1:], _canonical(v)) for k, v in overrides.items()
                   if k.startswith(group + ".") and k not in SAME_SCORES)
    return name + ("[" + ",".join(f"{k}={v}" for k, v in extra) + "]" if extra else "")


class BadRecord(ValueError):
    """A run record that cannot be used (the message says which file and why)."""


def read_run(path: Path) -> Run:
    """The run record ``path`` (a ``metrics.json``) with its ``per_query.csv``.

    Raises:
        BadRecord: naming the file and what is wrong with it.
    """
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadRecord(f"{path} is not valid JSON ({err.msg}, line {err.lineno} column "
                        f"{err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadRecord(f"{path} cannot be read ({err})") from None
    if not isinstance(record, dict):
        raise BadRecord(f"{path} holds a JSON {type(record).__name__}, not a run record "
                        "(an object with task, estimator, seed and the metrics)")
    missing = [k for k in ("task", "estimator", "seed") if k not in record]
    if missing:
        raise BadRecord(f"{path} lacks {', '.join(missing)}; it was not written by tda-bench")
    seed = record["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int | float) or seed != int(seed) \
            or seed < 0:
        raise BadRecord(f"{path}: seed must be a non-negative integer, got {seed!r}")
    for key in ("task", "estimator"):
        if not isinstance(record[key], str) or not record[key]:
            raise BadRecord(f"{path}: {key} must be a name, got {record[key]!r}")
    for key, value in record.items():
        if (is_headline(key) or is_cost(key)) and value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRecord(f"{path}: {key} must be a number or null, got {value!r}")
    csv = path.with_name("per_query.csv")
    try:
        per_query = pd.read_csv(csv) if csv.exists() else None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadRecord(f"{csv} cannot be read as a table ({reason})") from None
    return Run(path.parent, record, per_query, parse_overrides(str(record.get("command", ""))))


def collect(directories: list[Path], strict: bool = False) -> list[Run]:
    """Every run record under ``directories``, sorted by path; a bad record is reported
    (path and reason) and skipped, or with ``strict`` refused.

    Raises:
        FileNotFoundError: when a directory does not exist or holds no record.
        BadRecord: with ``strict``, at the first bad record.
    """
    runs = []
    for directory in directories:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory} is not a directory; pass the output folders "
                                    "of tda-bench runs (e.g. multirun/ or outputs/).")
        for path in sorted(Path(directory).rglob("metrics.json")):
            try:
                runs.append(read_run(path))
            except BadRecord as err:
                if strict:
                    raise BadRecord(f"{err}; fix or remove it (without --strict it is skipped)"
                                    ) from None
                print(f"tda-bench-leaderboard: warning: skipping a bad record: {err}",
                      file=sys.stderr)
    if not runs:
        where = ", ".join(map(str, directories))
        raise FileNotFoundError(f"no metrics.json run records under {where}; run tda-bench "
                                "first or check the paths.")
    return sorted(runs, key=lambda r: str(r.path))


def label_runs(runs: list[Run]) -> pd.DataFrame:
    """One row per run: ``task`` and ``estimator`` labels, ``seed``, ``run`` (the Run).

    Duplicates of (task, estimator, seed) keep the earliest record by (date, path).
    """
    rows = []
    variants: dict[str, set[str]] = {}
    for run in runs:
        variants.setdefault(run.record["task"], set()).add(
            _variant(run.record["task"], run.overrides, "task"))
    for run in runs:
        task = run.record["task"]
        full = _variant(task, run.overrides, "task")
        rows.append({"task": full if len(variants[task]) > 1 else task,
                     "estimator": _variant(run.record["estimator"], run.overrides, "estimator"),
                     "seed": run.seed, "date": str(run.record.get("date", "")),
                     "path": str(run.path), "run": run})
    frame = pd.DataFrame(rows).sort_values(["task", "estimator", "seed", "date", "path"])
    duplicated = frame.duplicated(["task", "estimator", "seed"], keep="first")
    for _, row in frame[duplicated].iterrows():
        print(f"tda-bench-leaderboard: warning: ignoring {row['path']}: another record of "
              f"{row['task']}/{row['estimator']}/seed{row['seed']} comes first", file=sys.stderr)
    return frame[~duplicated].reset_index(drop=True)


def query_values(per_query: pd.DataFrame | None, metric: str) -> np.ndarray | None:
    """The per-query values ``[Q]`` behind a record's ``metric``, or None.

    The column is the metric's name (``mrr``'s is ``rr``). Where ``per_query.csv`` has a
    ``query_set`` column (fact tracing: forward and flipped queries), ``{set}_{metric}`` is
    the metric over that set's rows and a plain ``metric`` is over the ``forward`` rows.
    """
    if per_query is None:
        return None
    sets = per_query["query_set"].astype(str) if "query_set" in per_query.columns else None
    candidates = [(metric, None)]
    if sets is not None:
        candidates = [(metric[len(name) + 1:], name) for name in sorted(set(sets))
                      if name and metric.startswith(f"{name}_")] + candidates
    for base, chosen in candidates:
        column = COLUMN_ALIASES.get(base, base)
        if column not in per_query.columns or column in ("query", "query_set"):
            continue
        if sets is not None and chosen is None and (sets == "forward").any():
            chosen = "forward"
        rows = per_query if chosen is None else per_query[sets == chosen]
        return pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
    return None


def _is_info(key: str) -> bool:
    """Whether ``key`` (or the metric of its ``{group}_`` variant) is an ``info`` metric."""
    return role_of(key) == "info" or ("_" in key and role_of(key.split("_", 1)[1]) == "info")


def metric_names(runs: list[Run]) -> list[str]:
    """Metrics present in the records: accuracy (the headline metrics and every key with
    per-query values but an ``info`` one, e.g. the noise ceiling) and costs (``seconds`` =
    fit + score, every ``*_mb`` memory key)."""
    found = set()
    for run in runs:
        found |= {k for k, v in run.record.items() if isinstance(v, int | float | None) and (
            is_headline(k) or is_cost(k) or is_headline((baseline_of(k) or ("", ""))[1])
            or (query_values(run.per_query, k) is not None and not _is_info(k)))}
        if "fit_seconds" in run.record and "score_seconds" in run.record:
            found.add("seconds")
    return render.metric_order(found - {"seed"})


def per_seed_values(run: Run, metric: str) -> tuple[float, np.ndarray]:
    """The run's ``metric``: its scalar and its per-query values ``[Q]`` (``[1]`` if none)."""
    value = run.record.get(metric)
    if metric == "seconds":
        parts = [run.record.get("fit_seconds"), run.record.get("score_seconds")]
        value = None if any(p is None for p in parts) else float(sum(parts))
    column = query_values(run.per_query, metric)
    if column is None or not column.size:
        column = np.array([np.nan if value is None else float(value)])
    if value is None:
        finite = column[np.isfinite(column)]
        value = float(finite.mean()) if finite.size else float("nan")
    return float(value), column


def expected_seeds(frame: pd.DataFrame, seeds: list[int] | None) -> dict[str, list[int]]:
    """Per task: ``seeds`` if given, else the union of the seeds seen for that task."""
    return {task: sorted(seeds) if seeds else sorted({int(s) for s in group["seed"]})
            for task, group in frame.groupby("task")}


def command_for(runs: list[Run], seeds: list[int]) -> str:
    """The command that reproduces a cell: the first record's, with every seed."""
    command = runs[0].record.get("command", "")
    tokens = shlex.split(command)
    if not tokens:
        return ""
    joined = ",".join(str(s) for s in seeds)
    rest = [t for t in tokens[1:] if t not in ("-m", "--multirun") and not t.startswith("seed=")]
    multi = ["-m"] if len(seeds) > 1 else []
    return shlex.join([tokens[0], *multi, *rest, f"seed={joined}"])
