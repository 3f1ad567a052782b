"""The leaderboard: run records (``metrics.json`` + ``per_query.csv``) -> tables and plots.

``tda-bench-leaderboard DIR [DIR ...]`` finds every run record under the directories
(recursively, so Hydra ``multirun/`` folders work), and writes into ``--out`` (``results/``):

* ``leaderboard.csv``: one row per estimator, columns ``{task}/{metric}`` with ``_lo``/``_hi``
  (95 % bootstrap interval), ``_best``, and ``{task}/n_seeds``, ``/missing_seeds``,
  ``/command``;
* ``LEADERBOARD.md``: one table per task (same numbers), best value per column in bold, rows
  with missing seeds marked †, the ``random`` floor and the LDS noise ceiling, the command
  that reproduces each row, and the commits, dates and package versions of the records;
* the plots of :mod:`bench.report.plots` (unless ``--no-plots``).

A record that cannot be read is reported with its path and skipped (``--strict``: refused);
every user error is one sentence and exit 2 (:mod:`bench.errors`).

Aggregation (per task, estimator and metric): the mean over seeds of each seed's metric, and
a percentile interval from a two-way bootstrap that resamples seeds and, jointly for all
seeds, queries (the query set is shared by the seeds). Its generator is seeded from
``--bootstrap-seed`` and the cell's name, so a rebuild is byte-identical and adding a row
leaves the others unchanged. Nothing in the output depends on the time of the build.

The metric specs (:mod:`bench.metrics`) say which columns lead, which are costs and which
way is better; records of runs that loaded plug-ins name them, and they are loaded here too.
Rows and columns: :mod:`bench.report.records`; intervals and paired differences:
:mod:`bench.report.stats`; rendering: :mod:`bench.report.tables`; plots:
:mod:`bench.report.plots`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from bench.errors import boundary
from bench.plugins import load_plugins
from bench.record import read_errors
from bench.report import stats
from bench.report import tables as render
from bench.report.records import collect, expected_seeds, label_runs, metric_names


def build(directories: list[Path], out: Path, seeds: list[int] | None = None,
          n_boot: int = 2000, seed: int = 0, plots: bool = True,
          argv: list[str] | None = None,
          compare: list[stats.Comparison] | None = None, strict: bool = True,
          strict_records: bool = False) -> pd.DataFrame:
    """Builds the leaderboard of the records under ``directories`` into ``out``.

    ``compare`` lists row pairs (A, B) whose paired difference A − B is reported
    (:func:`bench.report.stats.differences`); with ``strict=False`` a pair whose rows are
    absent is skipped. A bad record is skipped with a warning, or with ``strict_records``
    refused (:func:`bench.report.records.collect`).

    Returns:
        the long table of cells (one row per task, estimator and metric).
    """
    if n_boot < 1:
        raise ValueError(f"--bootstrap must be at least 1, got {n_boot}")
    runs = collect(directories, strict=strict_records)
    load_plugins(sorted({name for run in runs for name in run.record.get("plugins") or []}))
    frame = label_runs(runs)
    metrics = metric_names(list(frame["run"]))
    cells = stats.aggregate(frame, metrics, expected_seeds(frame, seeds), n_boot, seed)
    if cells.empty:
        raise ValueError("the run records hold no metrics; were they written by tda-bench?")
    not_run = read_errors(directories)
    diffs = stats.differences(frame, metrics, [tuple(c) for c in compare or []], n_boot, seed,
                                strict)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        from bench.report import plots as plotting

        written = plotting.all_plots(cells, frame, out)
    render.wide(cells).to_csv(out / "leaderboard.csv", index=False, float_format="%.6g",
                              lineterminator="\n")
    context = {"argv": argv, "n_boot": n_boot, "seed": seed, "runs": list(frame["run"]),
               "plots": sorted(p.name for p in written), "paired": render.paired_section(diffs),
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
    """Entry point of the ``tda-bench-leaderboard`` console script (user errors: one
    sentence, exit 2)."""
    with boundary("tda-bench-leaderboard"):
        _main(argv)


def _main(argv: list[str] | None) -> None:
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
    parser.add_argument("--strict", action="store_true",
                        help="refuse a bad record (default: report it with its path, skip it)")
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
    seeds = parse_seeds(args.seeds) if args.seeds else None
    cells = build(args.dirs, args.out, seeds, args.bootstrap, args.bootstrap_seed,
                  not args.no_plots, shown, args.compare, strict_records=args.strict)
    print(f"wrote {args.out / 'LEADERBOARD.md'} and {args.out / 'leaderboard.csv'}")
    if args.wandb_project:
        from bench.report.publish import log_leaderboard

        log_leaderboard(args.out, args.wandb_project, cells)


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
