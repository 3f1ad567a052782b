"""The leaderboard: run records (``metrics.json`` + ``per_query.csv``) -> tables and plots.

``tda-bench-leaderboard DIR [DIR ...]`` finds every run record under the directories
(recursively, so Hydra ``multirun/`` folders work), and writes into ``--out`` (``results/``):

* ``leaderboard.csv``: one row per estimator, columns ``{task}/{metric}`` with ``_lo``/``_hi``
  (95 % bootstrap interval), ``_best``, and ``{task}/n_seeds``, ``/missing_seeds``,
  ``/command``;
* ``LEADERBOARD.md``: one table per task (same numbers), best value per column in bold, rows
  with missing seeds marked †, the ``random`` floor and the LDS noise ceiling, the command
  that reproduces each row, and the commits, dates and package versions of the records;
* the plots of :mod:`bench.plots` (unless ``--no-plots``).

Aggregation (per task, estimator and metric): the mean over seeds of each seed's metric, and
a percentile interval from a two-way bootstrap that resamples seeds and, jointly for all
seeds, queries (the query set is shared by the seeds). Its generator is seeded from
``--bootstrap-seed`` and the cell's name, so a rebuild is byte-identical and adding a row
leaves the others unchanged. Nothing in the output depends on the time of the build.

A row is an estimator plus its ``estimator.*`` overrides (``ekfac[damping=0.01]``; not
``per_layer`` or ``chunk_size``, which leave the scores unchanged); a task
column is a task, labelled with its ``task.*`` overrides only when one task name was run
with several. Records of the same row, task and seed after the first (by date, then path)
are ignored with a warning.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import leaderboard_tables as render
from bench import paired
from bench.leaderboard_tables import ACCURACY, CEILING, FLOOR, is_cost
from bench.record import read_errors

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


def collect(directories: list[Path]) -> list[Run]:
    """Every run record under ``directories``, sorted by path.

    Raises:
        FileNotFoundError: when a directory does not exist or holds no record.
    """
    runs = []
    for directory in directories:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory} is not a directory; pass the output folders "
                                    "of tda-bench runs (e.g. multirun/ or outputs/).")
        for path in sorted(Path(directory).rglob("metrics.json")):
            record = json.loads(path.read_text())
            if not {"task", "estimator", "seed"} <= record.keys():
                continue
            csv = path.with_name("per_query.csv")
            per_query = pd.read_csv(csv) if csv.exists() else None
            runs.append(Run(path.parent, record, per_query,
                            parse_overrides(record.get("command", ""))))
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


def metric_names(runs: list[Run]) -> list[str]:
    """Metrics present in the records: accuracy (the :data:`ACCURACY` keys and every key with
    per-query values) and costs (``seconds`` = fit + score, every ``*_mb`` memory key)."""
    found = set()
    for run in runs:
        found |= {k for k, v in run.record.items() if isinstance(v, int | float | None) and (
            k in ACCURACY or is_cost(k) or query_values(run.per_query, k) is not None)}
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
            pairs = [per_seed_values(r, metric) for r in runs]
            scalars = np.array([p[0] for p in pairs])
            if not np.isfinite(scalars).any():
                continue
            values = _stack([p[1] for p in pairs])
            lo, hi = bootstrap_interval(values, cell_seed(seed, task, estimator, metric), n_boot)
            rows.append({**base, "metric": metric, "mean": float(np.nanmean(scalars)),
                         "lo": lo, "hi": hi, "higher_is_better": not is_cost(metric)})
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


def mark_best(cells: pd.DataFrame) -> pd.DataFrame:
    """Adds ``best``: the best mean per (task, metric) among the estimators (not the
    ``random`` floor or the ceiling, which are references)."""
    cells = cells.copy()
    cells["best"] = False
    candidates = ~cells["estimator"].isin([CEILING, FLOOR])
    for _, group in cells[candidates].groupby(["task", "metric"]):
        means = group["mean"]
        if not np.isfinite(means).any():
            continue
        target = means.max() if group["higher_is_better"].iloc[0] else means.min()
        cells.loc[group.index[means == target], "best"] = True
    return cells


def expected_seeds(frame: pd.DataFrame, seeds: list[int] | None) -> dict[str, list[int]]:
    """Per task: ``seeds`` if given, else the union of the seeds seen for that task."""
    return {task: sorted(seeds) if seeds else sorted({int(s) for s in group["seed"]})
            for task, group in frame.groupby("task")}


def build(directories: list[Path], out: Path, seeds: list[int] | None = None,
          n_boot: int = 2000, seed: int = 0, plots: bool = True,
          argv: list[str] | None = None,
          compare: list[paired.Comparison] | None = None, strict: bool = True) -> pd.DataFrame:
    """Builds the leaderboard of the records under ``directories`` into ``out``.

    ``compare`` lists row pairs (A, B) whose paired difference A − B is reported
    (:mod:`bench.paired`); with ``strict=False`` a pair whose rows are absent is skipped.

    Returns:
        the long table of cells (one row per task, estimator and metric).
    """
    if n_boot < 1:
        raise ValueError(f"--bootstrap must be at least 1, got {n_boot}")
    runs = collect(directories)
    frame = label_runs(runs)
    metrics = metric_names(list(frame["run"]))
    cells = aggregate(frame, metrics, expected_seeds(frame, seeds), n_boot, seed)
    if cells.empty:
        raise ValueError("the run records hold no metrics; were they written by tda-bench?")
    not_run = read_errors(directories)
    diffs = paired.differences(frame, metrics, [tuple(c) for c in compare or []], n_boot, seed,
                                strict)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        from bench import plots as plotting

        written = plotting.all_plots(cells, frame, out)
    render.wide(cells).to_csv(out / "leaderboard.csv", index=False, float_format="%.6g",
                              lineterminator="\n")
    context = {"argv": argv, "n_boot": n_boot, "seed": seed, "runs": list(frame["run"]),
               "plots": sorted(p.name for p in written), "paired": paired.section(diffs),
               "not_run": not_run}
    (out / "LEADERBOARD.md").write_text(render.markdown(cells, context))
    return cells


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        return sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers such as 0,1,2, got "
                         f"{text!r}") from None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tda-bench-leaderboard`` console script."""
    parser = argparse.ArgumentParser(prog="tda-bench-leaderboard", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="output folders of tda-bench runs")
    parser.add_argument("--out", type=Path, default=Path("results"), help="default: results")
    parser.add_argument("--seeds", default=None,
                        help="expected seeds, e.g. 0,1,2 (default: every seed seen per task)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples (default 2000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="default 0")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                        help="also report the paired difference of rows A and B (repeatable)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="first copy the records (metrics.json, per_query.csv, error.json) "
                             "into this folder and build from the copy, e.g. to commit them")
    parser.add_argument("--wandb-project", default=None,
                        help="also log the table and plots as a W&B run named 'leaderboard' "
                             "(mode from WANDB_MODE, default offline)")
    args = parser.parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    if args.archive:
        from bench.record import archive

        print(f"archived {archive(args.dirs, args.archive)} run folders into {args.archive}")
        shown = [str(args.archive), *_without_sources(shown, args.dirs)]
        args.dirs = [args.archive]
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else None
        build(args.dirs, args.out, seeds, args.bootstrap, args.bootstrap_seed,
              not args.no_plots, shown, args.compare)
    except (FileNotFoundError, ValueError) as err:
        print(f"tda-bench-leaderboard: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out / 'LEADERBOARD.md'} and {args.out / 'leaderboard.csv'}")
    if args.wandb_project:
        from bench.loggers import log_leaderboard

        log_leaderboard(args.out, args.wandb_project)


def _without_sources(argv: list[str], dirs: list[Path]) -> list[str]:
    """``argv`` less the record folders and the ``--archive`` option: the rebuild command."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--archive":
            skip = True
        elif not token.startswith("--archive=") and token not in {str(d) for d in dirs}:
            out.append(token)
    return out


if __name__ == "__main__":
    main()
