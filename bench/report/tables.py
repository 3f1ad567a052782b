"""Rendering of the leaderboard's long table of cells into ``leaderboard.csv`` and
``LEADERBOARD.md`` (see :mod:`bench.report.leaderboard`). Deterministic: sorted, fixed formats,
no build time. Which metrics lead a table, which are costs and which way is better come from
the metric specs (:mod:`bench.metrics`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.metrics import baseline_rows, higher_is_better, is_cost, is_headline
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
    """Estimators alphabetically, then the baseline rankings, the ``random`` floor and the
    noise ceiling."""
    names = set(estimators)
    tail = [n for n in (*baseline_rows(), FLOOR, CEILING) if n in names]
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


def task_tables(task: str, cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables of one task as text cells: ``headline`` (the headline metrics and the
    costs) and ``diagnostics`` (every other metric; absent when there is none). One row per
    estimator, baseline ranking, the floor and the ceiling that has a value in the table;
    columns ``estimator``, ``{metric} ↑/↓`` and ``seeds``."""
    here = cells[cells["task"] == task]
    metrics = metric_order(here["metric"])
    headline = [m for m in metrics if is_headline(m) or is_cost(m)] or metrics
    parts = {"headline": headline, "diagnostics": [m for m in metrics if m not in headline]}
    out = {}
    for part, chosen in parts.items():
        rows = []
        for estimator in estimator_order(here["estimator"]):
            found = here[(here["estimator"] == estimator) & here["metric"].isin(chosen)]
            if found.empty:
                continue
            by = {r["metric"]: r for _, r in found.iterrows()}
            rows.append({"estimator": _row_name(estimator, found.iloc[0]),
                         **{_arrow(m): _cell(by.get(m), m) for m in chosen},
                         "seeds": _seeds(estimator, found.iloc[0])})
        if rows:
            out[part] = pd.DataFrame(rows, columns=["estimator", *map(_arrow, chosen), "seeds"])
    return out


def _arrow(metric: str) -> str:
    return f"{metric} {'↑' if higher_is_better(metric) else '↓'}"


def _row_name(estimator: str, first: pd.Series) -> str:
    if estimator == CEILING or estimator in baseline_rows():
        return f"*{estimator}*"
    return estimator + (" †" if first["missing_seeds"] else "")


def _seeds(estimator: str, first: pd.Series) -> str:
    if estimator == CEILING:
        return ""
    seeds = f"{first['n_seeds']}/{first['expected_seeds']}"
    return seeds + (f" (missing {first['missing_seeds']})" if first["missing_seeds"] else "")


def _md_table(frame: pd.DataFrame) -> list[str]:
    return [_md_row(list(frame.columns)), "|" + "---|" * len(frame.columns),
            *[_md_row(list(row)) for row in frame.itertuples(index=False)]]


def task_section(task: str, cells: pd.DataFrame) -> list[str]:
    """The markdown tables of one task (headline, then diagnostics), then its commands."""
    tables = task_tables(task, cells)
    lines = [f"## {task}", "", *_md_table(tables["headline"])]
    if "diagnostics" in tables:
        lines += ["", "Diagnostics:", "", *_md_table(tables["diagnostics"])]
    here = cells[cells["task"] == task]
    commands = []
    for estimator in estimator_order(here["estimator"]):
        if estimator == CEILING or estimator in baseline_rows():
            continue
        first = here[here["estimator"] == estimator].iloc[0]
        commands.append(_md_row([estimator, f"`{first['command']}`", f"`{first['commit']}`"]))
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
        "(MiB). Each task has a headline table (its headline accuracy metrics and the costs) and "
        "a diagnostics table (the rest). `random` is the floor; *random ranking*, "
        "*gradient-norm ranking* and *random removal* are baselines that do not depend on the "
        "estimator (read from one estimator's records); the *LDS noise ceiling* is the "
        "split-half Spearman "
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
