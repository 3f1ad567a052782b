"""Statistics of the leaderboard: per-cell means with two-way bootstrap intervals over seeds
and queries, the best row per column, and paired differences of two rows.

Aggregation (per task, estimator and metric): the mean over seeds of each seed's metric, and
a percentile interval from a two-way bootstrap that resamples seeds and, jointly for all
seeds, queries (the query set is shared by the seeds). Its generator is seeded from the
bootstrap seed and the cell's name, so a rebuild is byte-identical and adding a row leaves the
others unchanged.

Paired differences: two estimators scored on the same task and seed see the same trained
model and queries, so per seed and query d = a − b, and the interval is the same two-way
bootstrap applied to d. This is the test of Grosse et al. 2023 (EK-FAC within LiSSA's
accuracy) and Chang et al. 2024 (full TrackStar above grad_cos).
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import pandas as pd

from bench.metrics import baseline_of, baseline_rows, higher_is_better, is_headline
from bench.report.records import command_for, per_seed_values
from bench.report.tables import CEILING, FLOOR

Comparison = tuple[str, str]  # (A, B): rows whose difference A − B is reported


def cell_seed(base: int, *names: str) -> np.random.Generator:
    """A generator seeded by ``base`` and the cell's names (independent of other cells)."""
    return np.random.default_rng([base, zlib.crc32("/".join(names).encode())])


def bootstrap_interval(values: np.ndarray, rng: np.random.Generator, n_boot: int = 2000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of each seed's mean over queries.

    Args:
        values: ``[S, Q]`` per-seed, per-query values (NaN where undefined).
        rng: the seeded generator.
        n_boot: bootstrap resamples.
        level: coverage of the interval.

    Returns:
        ``(lo, hi)``; NaN when there is a single value.
    """
    n_seeds, n_queries = values.shape
    if np.isfinite(values).sum() < 2:
        return float("nan"), float("nan")
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    queries = rng.integers(0, n_queries, size=(n_boot, n_queries))
    sample = values[seeds[:, :, None], queries[:, None, :]]  # [B, S, Q]
    finite = np.isfinite(sample)
    counts = finite.sum(axis=2)
    sums = np.where(finite, sample, 0.0).sum(axis=2)
    seed_means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)  # [B, S]
    valid = np.isfinite(seed_means)
    stats = np.where(valid, seed_means, 0.0).sum(1) / np.maximum(valid.sum(1), 1)
    stats = stats[valid.any(1)]
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)


def _stack(columns: list[np.ndarray]) -> np.ndarray:
    """Per-seed columns of unequal length -> ``[S, max Q]``, padded with NaN."""
    width = max(len(c) for c in columns)
    return np.stack([np.pad(c, (0, width - len(c)), constant_values=np.nan) for c in columns])


def aggregate(frame: pd.DataFrame, metrics: list[str], expected: dict[str, list[int]],
              n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Long table, one row per (task, estimator, metric): mean, lo, hi, n_seeds, ...

    Args:
        frame: :func:`label_runs` output.
        metrics: metric names (accuracy and cost, see :func:`metric_names`).
        expected: per task, the seeds every estimator should have.
        n_boot: bootstrap resamples.
        seed: base seed of the bootstrap generators.
    """
    rows = []
    for (task, estimator), group in frame.groupby(["task", "estimator"], sort=True):
        runs = list(group["run"])
        seeds = sorted(int(s) for s in group["seed"])
        missing = sorted(set(expected[task]) - set(seeds))
        base = {"task": task, "estimator": estimator, "n_seeds": len(seeds),
                "expected_seeds": len(expected[task]),
                "missing_seeds": ",".join(map(str, missing)), "command": command_for(runs, seeds),
                "commit": ",".join(sorted({str(r.record.get("commit", "unknown")) for r in runs}))}
        for metric in metrics:
            if baseline_of(metric) is not None:  # a row of its own, below
                continue
            value = cell(runs, metric, cell_seed(seed, task, estimator, metric), n_boot)
            if value is not None:
                rows.append({**base, **value, "metric": metric})
    rows += _baseline_cells(frame, metrics, expected, n_boot, seed)
    ceilings = [{"task": task, "value": float(run.record["lds_ceiling"])}
                for task, run in zip(frame["task"], frame["run"], strict=True)
                if run.record.get("lds_ceiling") is not None]
    if ceilings:
        # A property of the task's ground truth (the same in every record of the task).
        per_task = pd.DataFrame(ceilings).groupby("task", as_index=False)["value"].mean()
        rows += [{"task": t, "estimator": CEILING, "metric": "lds", "mean": v, "lo": np.nan,
                  "hi": np.nan, "higher_is_better": True, "n_seeds": 0, "expected_seeds": 0,
                  "missing_seeds": "", "command": "", "commit": ""}
                 for t, v in zip(per_task["task"], per_task["value"], strict=True)]
    cells = pd.DataFrame(rows)
    if cells.empty:
        return cells
    return mark_best(cells)


def cell(runs: list, metric: str, rng: np.random.Generator, n_boot: int) -> dict | None:
    """``{mean, lo, hi, higher_is_better}`` of ``metric`` over the seeds ``runs``, or None."""
    pairs = [per_seed_values(r, metric) for r in runs]
    scalars = np.array([p[0] for p in pairs])
    if not np.isfinite(scalars).any():
        return None
    lo, hi = bootstrap_interval(_stack([p[1] for p in pairs]), rng, n_boot)
    return {"mean": float(np.nanmean(scalars)), "lo": lo, "hi": hi,
            "higher_is_better": higher_is_better(metric)}


def _baseline_cells(frame: pd.DataFrame, metrics: list[str], expected: dict[str, list[int]],
                    n_boot: int, seed: int) -> list[dict]:
    """Cells of the baseline rows (:func:`bench.metrics.baseline_of`): a baseline ranking's
    value does not depend on the estimator, so it is read from the records of the first
    estimator (by name) that has it, and shown once, as the row's ``metric`` column."""
    rows = []
    for task, group in frame.groupby("task", sort=True):
        for metric in metrics:
            found = baseline_of(metric)
            if found is None:
                continue
            row, target = found
            for estimator, runs in group.groupby("estimator", sort=True)["run"]:
                value = cell(list(runs), metric, cell_seed(seed, task, row, target), n_boot)
                if value is not None:
                    rows.append({"task": task, "estimator": row, "metric": target, **value,
                                 "n_seeds": len(runs), "expected_seeds": len(expected[task]),
                                 "missing_seeds": "", "command": f"(the records of {estimator})",
                                 "commit": ""})
                    break
    return rows


def mark_best(cells: pd.DataFrame) -> pd.DataFrame:
    """Adds ``best``: the best mean per (task, metric) among the estimators (not the
    ``random`` floor, the baseline rankings or the ceiling, which are references)."""
    cells = cells.copy()
    cells["best"] = False
    candidates = ~cells["estimator"].isin([CEILING, FLOOR, *baseline_rows()])
    for _, group in cells[candidates].groupby(["task", "metric"]):
        means = group["mean"]
        if not np.isfinite(means).any():
            continue
        target = means.max() if group["higher_is_better"].iloc[0] else means.min()
        cells.loc[group.index[means == target], "best"] = True
    return cells


def _per_seed(frame: pd.DataFrame, task: str, estimator: str) -> dict[int, object]:
    rows = frame[(frame["task"] == task) & (frame["estimator"] == estimator)]
    return {int(s): run for s, run in zip(rows["seed"], rows["run"], strict=True)}


def differences(frame: pd.DataFrame, metrics: list[str], compare: list[Comparison],
                n_boot: int = 2000, seed: int = 0, strict: bool = True) -> pd.DataFrame:
    """One row per (task, A, B, headline metric of :mod:`bench.metrics`) with both rows
    present on common seeds.

    Columns: ``task, a, b, metric, a_mean, b_mean, diff, lo, hi, seeds`` where ``diff`` is
    the mean over common seeds of (A's metric − B's) and ``lo``/``hi`` the 95 % paired
    bootstrap interval of that difference. A pair naming a row that is absent raises
    ``ValueError`` when ``strict``, else it is skipped with a warning (a shrunk sweep).
    """
    known = set(frame["estimator"])
    present = []
    for a, b in compare:
        absent = [name for name in (a, b) if name not in known]
        if not absent:
            present.append((a, b))
            continue
        message = (f"--compare: no row named {absent[0]!r}; rows are: "
                   f"{', '.join(sorted(known))}")
        if strict:
            raise ValueError(message)
        print(f"tda-bench-leaderboard: warning: {message}", file=sys.stderr)
    rows = []
    for task in sorted(frame["task"].unique()):
        for a, b in present:
            runs_a, runs_b = _per_seed(frame, task, a), _per_seed(frame, task, b)
            seeds = sorted(set(runs_a) & set(runs_b))
            if not seeds:
                continue
            for metric in (m for m in metrics if is_headline(m)):
                pairs = [(per_seed_values(runs_a[s], metric), per_seed_values(runs_b[s], metric))
                         for s in seeds]
                scalar_a = np.array([p[0][0] for p in pairs])
                scalar_b = np.array([p[1][0] for p in pairs])
                if not (np.isfinite(scalar_a).any() and np.isfinite(scalar_b).any()):
                    continue
                same = all(len(pa[1]) == len(pb[1]) for pa, pb in pairs)
                if not same:
                    raise ValueError(f"--compare {a} {b}: the per-query tables of {task} "
                                     f"differ in length for {metric}; were the runs made with "
                                     "different query sets?")
                d = np.stack([pa[1] - pb[1] for pa, pb in pairs])  # [S, Q]
                lo, hi = bootstrap_interval(d, cell_seed(seed, task, a, b, metric), n_boot)
                rows.append({"task": task, "a": a, "b": b, "metric": metric,
                             "a_mean": float(np.nanmean(scalar_a)),
                             "b_mean": float(np.nanmean(scalar_b)),
                             "diff": float(np.nanmean(scalar_a - scalar_b)), "lo": lo, "hi": hi,
                             "seeds": ",".join(map(str, seeds))})
    return pd.DataFrame(rows)
