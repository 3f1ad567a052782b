"""Where a sweep's time goes: the stage seconds its jobs record, summed per task and
estimator, and the sweep's wall span.

    python -m studies.sweep_profile multirun/leaderboard/<date> [more folders]
        [--out results/leaderboard_profile.md]

Every job of ``tda-bench`` records ``model_seconds`` (training or loading the attributed
model), ``ground_truth_seconds`` (retraining for LOO/LDS/PBRF, or loading it),
``fit_seconds``, ``score_seconds``, ``evaluate_seconds`` (tail-patch and the metrics) and
``job_seconds`` (the whole job; what the stages leave is resolving the config and building
the task). The wall span runs from the first job's start (its record's date less its
``job_seconds``) to the last record's date, so with jobs in parallel it is less than the
jobs' sum; imports and process start-up fall between jobs and are in the span, not in the
sum. Records from before the stage clock (no ``job_seconds``) count only fit + score.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd

from bench.report.records import collect

STAGES = ["model", "ground_truth", "fit", "score", "evaluate"]


def job_rows(folders: list[Path]) -> pd.DataFrame:
    """One row per job record (``metrics.json``) under ``folders``: task, estimator, seed,
    the stage seconds (0 where not recorded), ``other`` (the job's rest) and its span."""
    try:
        runs = collect(list(folders))
    except FileNotFoundError:
        raise SystemExit(f"no metrics.json under {', '.join(map(str, folders))}: point "
                         "sweep_profile at a sweep's folder (hydra.sweep.dir)") from None
    rows = []
    for record in (run.record for run in runs):
        stages = {s: float(record.get(f"{s}_seconds") or 0.0) for s in STAGES}
        job = float(record.get("job_seconds") or sum(stages.values()))
        end = datetime.fromisoformat(record["date"]) if record.get("date") else None
        rows.append({"task": record.get("task"), "estimator": record.get("estimator"),
                     "commit": record.get("commit"),
                     "seed": record.get("seed"), **stages, "job": job,
                     "other": max(job - sum(stages.values()), 0.0), "end": end,
                     "begin": end - timedelta(seconds=job) if end else None})
    return pd.DataFrame(rows)


def span_seconds(rows: pd.DataFrame) -> float | None:
    """First job's start to last job's end, seconds (None without dates)."""
    dated = rows.dropna(subset=["end"])
    if dated.empty:
        return None
    return (dated["end"].max() - dated["begin"].min()).total_seconds()


def _table(frame: pd.DataFrame, by: list[str]) -> list[str]:
    columns = [*STAGES, "other", "job"]
    sums = frame.groupby(by, sort=True)[columns].sum()
    sums["jobs"] = frame.groupby(by, sort=True).size()
    sums = sums.sort_values("job", ascending=False)
    head = [*by, "jobs", *(f"{c} s" for c in columns), "share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = float(frame["job"].sum()) or 1.0
    for key, row in sums.iterrows():
        names = key if isinstance(key, tuple) else (key,)
        cells = [*map(str, names), str(int(row["jobs"])), *(f"{row[c]:.0f}" for c in columns),
                 f"{100 * row['job'] / total:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: pd.DataFrame, argv: list[str]) -> str:
    span = span_seconds(rows)
    stage_sum = {s: float(rows[s].sum()) for s in [*STAGES, "other"]}
    total = float(rows["job"].sum())
    lines = ["# Sweep profile", "",
             f"Built with `python -m studies.sweep_profile {' '.join(argv)}` from "
             f"{len(rows)} job records (commit: "
             f"{', '.join(sorted({str(c) for c in rows['commit']}))}). A job that waits for "
             "another's lock on the same ground truth counts the wait as ground_truth.", "",
             f"- jobs' sum: {total:.0f} s ({total / 60:.1f} min)",
             f"- wall span: {span:.0f} s ({span / 60:.1f} min)" if span is not None
             else "- wall span: unknown (records without dates)",
             "- per stage: " + ", ".join(f"{s} {v:.0f} s ({100 * v / (total or 1):.0f} %)"
                                         for s, v in stage_sum.items()), "",
             "## Per task", "", *_table(rows, ["task"]), "",
             "## Per task and estimator", "", *_table(rows, ["task", "estimator"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="sweep folders with job records")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: print)")
    args = parser.parse_args(argv)
    text = markdown(job_rows(args.folders),
                    [*map(str, args.folders), *(["--out", str(args.out)] if args.out else [])])
    if args.out is None:
        print(text, end="")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
