"""Rendering of the leaderboard's long table of cells into ``leaderboard.csv`` and
``LEADERBOARD.md`` (see :mod:`bench.report.leaderboard`). Deterministic: sorted, fixed formats,
no build time. Which metrics lead a table, which are costs and which way is better come from
the metric specs (:mod:`bench.metrics`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.metrics import higher_is_better, is_cost, is_headline
from bench.metrics.registry import order_of

CEILING = "LDS noise ceiling"
FLOOR = "random"


def metric_order(metrics) -> list[str]:
    """Headline metrics in their specs' order (:mod:`bench.metrics`), then every other
    metric alphabetically, then the costs in their specs' order."""
    metrics = set(metrics)
    headline = sorted((m for m in metrics if is_headline(m)), key=order_of)
    costs = sorted((m for m in metrics if is_cost(m)), key=order_of)
    return headline + sorted(metrics - set(headline) - set(costs)) + costs


def estimator_order(estimators) -> list[str]:
    """Estimators alphabetically, then the ``random`` floor, then the noise ceiling."""
    names = set(estimators)
    tail = [n for n in (FLOOR, CEILING) if n in names]
    return sorted(names - set(tail)) + tail


def fmt(value: float, metric: str) -> str:
    """A number in the metric's fixed format (empty for NaN)."""
    if value is None or not np.isfinite(value):
        return ""
    if metric == "seconds":
        return f"{value:.3g}"
    if is_cost(metric):
        return f"{value:.0f}"
    return f"{value:.3f}"


def wide(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per estimator; per task: ``{task}/{metric}`` with ``_lo``, ``_hi``, ``_best``,
    and ``{task}/n_seeds``, ``/expected_seeds``, ``/missing_seeds``, ``/command``,
    ``/commit``."""
    estimators = estimator_order(cells["estimator"])
    table = pd.DataFrame({"estimator": estimators})
    for task in sorted(cells["task"].unique()):
        here = cells[cells["task"] == task]
        columns: dict[str, Any] = {}
        for metric in metric_order(here["metric"]):
            by = here[here["metric"] == metric].set_index("estimator")
            for suffix, key in (("", "mean"), ("_lo", "lo"), ("_hi", "hi"), ("_best", "best")):
                columns[f"{task}/{metric}{suffix}"] = [by[key].get(e, np.nan) for e in estimators]
        info = here.drop_duplicates("estimator").set_index("estimator")
        for key in ("n_seeds", "expected_seeds", "missing_seeds", "command", "commit"):
            columns[f"{task}/{key}"] = [info[key].get(e, np.nan) if e != CEILING else np.nan
                                        for e in estimators]
        table = pd.concat([table, pd.DataFrame(columns)], axis=1)
    return table


def _cell(row: pd.Series | None, metric: str) -> str:
    if row is None:
        return ""
    text = fmt(row["mean"], metric)
    if bool(row.get("best", False)):
        text = f"**{text}**"
    if np.isfinite(row["lo"]) and np.isfinite(row["hi"]):
        text += f" [{fmt(row['lo'], metric)}, {fmt(row['hi'], metric)}]"
    return text


def _md_row(values: list[str]) -> str:
    return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"


def task_section(task: str, cells: pd.DataFrame) -> list[str]:
    """The markdown table of one task, then its commands."""
    here = cells[cells["task"] == task]
    metrics = metric_order(here["metric"])
    arrows = [f"{m} {'↑' if higher_is_better(m) else '↓'}" for m in metrics]
    lines = [f"## {task}", "", _md_row(["estimator", *arrows, "seeds"]),
             "|" + "---|" * (len(metrics) + 2)]
    commands = []
    for estimator in estimator_order(here["estimator"]):
        rows = here[here["estimator"] == estimator]
        by = {r["metric"]: r for _, r in rows.iterrows()}
        first = rows.iloc[0]
        name, seeds = estimator, ""
        if estimator == CEILING:
            name = f"*{CEILING}*"
        else:
            seeds = f"{first['n_seeds']}/{first['expected_seeds']}"
            if first["missing_seeds"]:
                name += " †"
                seeds += f" (missing {first['missing_seeds']})"
            commands.append(_md_row([estimator, f"`{first['command']}`",
                                     f"`{first['commit']}`"]))
        lines.append(_md_row([name, *[_cell(by.get(m), m) for m in metrics], seeds]))
    lines += ["", "Reproduce:", "", _md_row(["estimator", "command", "commit"]), "|---|---|---|",
              *commands, ""]
    return lines


def provenance(runs: list) -> list[str]:
    """Commits (with their run counts and date ranges) and package versions of the records."""
    frame = pd.DataFrame({"commit": [str(r.record.get("commit", "unknown")) for r in runs],
                          "date": [str(r.record.get("date", "")) for r in runs]})
    lines = ["## Provenance", "", _md_row(["commit", "runs", "first date", "last date"]),
             "|---|---|---|---|"]
    for commit, group in frame.groupby("commit", sort=True):
        lines.append(_md_row([f"`{commit}`", str(len(group)), group["date"].min(),
                              group["date"].max()]))
    versions: dict[str, set[str]] = {}
    for run in runs:
        for package, version in (run.record.get("versions") or {}).items():
            versions.setdefault(package, set()).add(str(version))
    lines += ["", _md_row(["package", "version(s)"]), "|---|---|"]
    lines += [_md_row([p, ", ".join(sorted(v))]) for p, v in sorted(versions.items())]
    return [*lines, ""]


def markdown(cells: pd.DataFrame, context: dict[str, Any]) -> str:
    """``LEADERBOARD.md``: header, one section per task, provenance."""
    argv = " ".join(context.get("argv") or [])
    runs = context["runs"]
    lines = [
        "# tda-bench leaderboard", "",
        "<!-- Generated by tda-bench-leaderboard from run records; rebuild, do not edit. -->", "",
        f"Built with `tda-bench-leaderboard {argv}` from {len(runs)} run records.".replace(
            "  ", " "), "",
        "Each cell is the mean over seeds with its 95 % interval in brackets (percentile "
        f"bootstrap over seeds and queries, {context['n_boot']} resamples, seed "
        f"{context['seed']}). **Bold**: best estimator in its column (↑ higher is better, ↓ "
        "lower is better). †: seeds missing, averaged over the seeds present (the seeds column "
        "says which). `seconds` is fit + score time; `peak_rss_mb` the run's peak resident memory "
        "(MiB). `random` is the floor; the *LDS noise ceiling* is the split-half Spearman "
        "correlation r between halves of the ground truth's retraining seeds: how "
        "reproducible the truth is. The LDS uses the mean of all seeds, which is less noisy, so "
        "an estimator can exceed r; a perfect one would reach about √(2r/(1 + r)).", "",
    ]
    if FLOOR not in set(cells["estimator"]):
        lines += ["No `random` records were found: the floor is missing.", ""]
    for task in sorted(cells["task"].unique()):
        lines += task_section(task, cells)
    lines += context.get("paired") or []
    not_run = context.get("not_run")
    if not_run is not None and not not_run.empty:
        lines += ["## Not run", "", "Jobs of the sweep that left `error.json` instead of a "
                  "record: the pair does not apply, or the sweep skips it (`skip:`).", "",
                  _md_row(["task", "estimator", "seeds", "why"]), "|---|---|---|---|"]
        lines += [_md_row([r["task"], r["estimator"], r["seeds"], r["error"]])
                  for _, r in not_run.iterrows()]
        lines.append("")
    if context.get("plots"):
        lines += ["## Plots", "", *[f"- [{name}]({name})" for name in context["plots"]], ""]
    lines += provenance(runs)
    return "\n".join(lines)


def paired_section(diffs: pd.DataFrame) -> list[str]:
    """The markdown section of :func:`bench.report.stats.differences` (empty when there is none)."""
    if diffs.empty:
        return []
    lines = ["## Paired differences", "",
             "A − B per seed and query, averaged; 95 % interval from the paired two-way "
             "bootstrap. *A > B* when the whole interval lies above 0, *A < B* below 0.", "",
             _md_row(["task", "A", "B", "metric", "A", "B", "A − B [95 % CI]", "verdict",
                      "seeds"]),
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in diffs.iterrows():
        verdict = "A > B" if r["lo"] > 0 else "A < B" if r["hi"] < 0 else "not separated"
        interval = f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]"
        lines.append(_md_row([r["task"], f"`{r['a']}`", f"`{r['b']}`", r["metric"],
                              f"{r['a_mean']:.4f}", f"{r['b_mean']:.4f}", interval, verdict,
                              r["seeds"]]))
    return [*lines, ""]
