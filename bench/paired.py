"""Paired comparisons of two leaderboard rows: is estimator A better than B on this task?

Two estimators scored on the same task and seed see the same trained model and the same
queries, so their difference is best judged *paired*: per seed and query, d = a − b, and the
interval is the two-way bootstrap of :func:`bench.leaderboard.bootstrap_interval` applied to
d (resampling seeds and, jointly for all seeds, queries). This is the test of Grosse et al.
2023 (EK-FAC within LiSSA's accuracy) and Chang et al. 2024 (full TrackStar above grad_cos).

``tda-bench-leaderboard DIR --compare A B`` adds a "Paired differences" section to
``LEADERBOARD.md``; A and B are row labels as the table shows them (``ekfac``,
``trackstar[hessian=mixed,...]``).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from bench.leaderboard_tables import ACCURACY, _md_row

Comparison = tuple[str, str]  # (A, B): rows whose difference A − B is reported


def _per_seed(frame: pd.DataFrame, task: str, estimator: str) -> dict[int, object]:
    rows = frame[(frame["task"] == task) & (frame["estimator"] == estimator)]
    return {int(s): run for s, run in zip(rows["seed"], rows["run"], strict=True)}


def differences(frame: pd.DataFrame, metrics: list[str], compare: list[Comparison],
                n_boot: int = 2000, seed: int = 0, strict: bool = True) -> pd.DataFrame:
    """One row per (task, A, B, headline accuracy metric: ``ACCURACY`` of
    :mod:`bench.leaderboard_tables`) with both rows present on common seeds.

    Columns: ``task, a, b, metric, a_mean, b_mean, diff, lo, hi, seeds`` where ``diff`` is
    the mean over common seeds of (A's metric − B's) and ``lo``/``hi`` the 95 % paired
    bootstrap interval of that difference. A pair naming a row that is absent raises
    ``ValueError`` when ``strict``, else it is skipped with a warning (a shrunk sweep).
    """
    from bench.leaderboard import bootstrap_interval, cell_seed, per_seed_values

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
            for metric in (m for m in metrics if m in ACCURACY):
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


def section(diffs: pd.DataFrame) -> list[str]:
    """The markdown section of :func:`differences` (empty when there is none)."""
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
