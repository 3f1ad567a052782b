"""``results/FINDINGS.md``: each claim of the two seed papers, the experiment that tests it,
the measured effect with its 95 % interval, and whether it reproduced.

    python -m studies.findings [--leaderboard results/records/leaderboard]
        [--scale results/records/model_scale] [--out results/FINDINGS.md]

Generated from committed run records only (``tda-bench experiment=leaderboard`` and
``tda-bench experiment=model_scale``), so it rebuilds byte for byte. Every interval is the
two-way bootstrap of :mod:`bench.report.stats` (seeds and, jointly, queries), paired where
the two sides share seeds and queries. Verdicts: *reproduced* (every effect the claim makes
has its interval on the claimed side of 0), *partly* (some), *not reproduced* (none).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.records import collect, label_runs, per_seed_values
from bench.report.stats import bootstrap_interval, cell_seed, differences

N_BOOT = 2000
SEED = 0


@dataclass
class Effect:
    """One measured effect ``value [lo, hi]`` and what the claim predicts of it: ``> 0``
    (the interval above 0), ``< 0`` (below) or ``≥ 0`` (not below: its top above 0)."""

    where: str
    what: str
    value: float
    lo: float
    hi: float
    claim: str = "> 0"

    @property
    def holds(self) -> bool:
        return {"> 0": self.lo > 0, "< 0": self.hi < 0, "≥ 0": self.hi > 0}[self.claim]


@dataclass
class Finding:
    claim: str
    paper: str
    command: str
    effects: list[Effect] = field(default_factory=list)
    note: str = ""

    @property
    def verdict(self) -> str:
        if not self.effects:
            return "not measured"
        held = sum(e.holds for e in self.effects)
        return ("reproduced" if held == len(self.effects) else "partly" if held
                else "not reproduced")


def _interval(values: np.ndarray, *names: str) -> tuple[float, float, float]:
    """Mean over seeds of the per-seed means of ``values [S, Q]`` and its interval."""
    means = [np.nanmean(row) for row in values if np.isfinite(row).any()]
    lo, hi = bootstrap_interval(values, cell_seed(SEED, *names), N_BOOT)
    return float(np.mean(means)) if means else float("nan"), lo, hi


def _runs(frame: pd.DataFrame, task: str, estimator: str) -> dict[int, object]:
    rows = frame[(frame["task"] == task) & (frame["estimator"] == estimator)]
    return {int(s): r for s, r in zip(rows["seed"], rows["run"], strict=True)}


def _paired(frame: pd.DataFrame, a: tuple[str, str], b: tuple[str, str], metric: str,
            transform: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    """``[S, Q]``: per common seed and query, ``metric`` of (task, estimator) a − b."""
    runs_a, runs_b = _runs(frame, *a), _runs(frame, *b)
    seeds = sorted(set(runs_a) & set(runs_b))
    rows = [transform(per_seed_values(runs_a[s], metric)[1])
            - transform(per_seed_values(runs_b[s], metric)[1]) for s in seeds]
    return np.stack(rows) if rows else np.zeros((0, 0))


def _pairs(frame: pd.DataFrame, metrics: list[str], a: str, b: str) -> pd.DataFrame:
    return differences(frame, metrics, [(a, b)], N_BOOT, SEED, strict=False)


def ekfac_vs_lissa(frame: pd.DataFrame) -> Finding:
    found = Finding("EK-FAC is about as accurate as LiSSA at a fraction of the cost",
                    "Grosse et al. 2023 (§5.1, Figs. 6-7)", "tda-bench experiment=leaderboard",
                    note="accuracy: EK-FAC − LiSSA on each task's headline metrics, claimed "
                         "not below 0 (the interval's top above 0); cost: LiSSA's fit + score "
                         "seconds over EK-FAC's, claimed ≥ 5.")
    metrics = ["lds", "loo_pearson", "pbrf_pearson", "mrr", "tail_patch"]
    for _, r in _pairs(frame, metrics, "ekfac", "lissa").iterrows():
        found.effects.append(Effect(r["task"], f"{r['metric']}: EK-FAC − LiSSA", r["diff"],
                                    r["lo"], r["hi"], "≥ 0"))
    for task in sorted(frame["task"].unique()):
        ek, li = _runs(frame, task, "ekfac"), _runs(frame, task, "lissa")
        seeds = sorted(set(ek) & set(li))
        if not seeds:
            continue
        ratio = np.array([[per_seed_values(li[s], "seconds")[0]
                           / per_seed_values(ek[s], "seconds")[0] - 5.0] for s in seeds])
        value, lo, hi = _interval(ratio, task, "ekfac_lissa_ratio")
        found.effects.append(Effect(task, "LiSSA seconds / EK-FAC seconds − 5", value, lo, hi))
    return found


def order_flip(frame: pd.DataFrame) -> Finding:
    found = Finding("Flipping a fact's phrase order lowers its influence",
                    "Grosse et al. 2023 (§5.3)", "tda-bench experiment=leaderboard",
                    note="the share of the total |score| that the documents stating the fact "
                         "carry (proponent_share), forward query − its flipped twin, paired by "
                         "fact; claimed > 0.")
    for estimator in ("ekfac", "grad_dot"):
        runs = _runs(frame, "facts", estimator)
        rows = []
        for s in sorted(runs):
            pq = runs[s].per_query
            if pq is None or "proponent_share" not in pq or "query_set" not in pq:
                continue
            values = pd.to_numeric(pq["proponent_share"], errors="coerce").to_numpy(float)
            sets = pq["query_set"].astype(str).to_numpy()
            forward, flipped = values[sets == "forward"], values[sets == "flipped"]
            rows.append(forward - flipped[: len(forward)])
        if rows:
            value, lo, hi = _interval(np.stack(rows), "facts", estimator, "order_flip")
            found.effects.append(Effect(f"facts / {estimator}",
                                        "proponent_share: forward − flipped", value, lo, hi))
    return found


def trackstar_vs_grad_cos(frame: pd.DataFrame) -> Finding:
    found = Finding("TrackStar attributes better than plain gradient similarity",
                    "Chang et al. 2024 (§5, Table 2)", "tda-bench experiment=leaderboard",
                    note="TrackStar − grad_cos on the fact task, claimed > 0.")
    for _, r in _pairs(frame, ["mrr", "recall@10"], "trackstar", "grad_cos").iterrows():
        found.effects.append(Effect(r["task"], f"{r['metric']}: TrackStar − grad_cos",
                                    r["diff"], r["lo"], r["hi"]))
    return found


def attribution_vs_influence(frame: pd.DataFrame) -> Finding:
    found = Finding("BM25 finds the documents that state a fact; gradient methods find those "
                    "that move the prediction", "Chang et al. 2024 (§6)",
                    "tda-bench experiment=leaderboard",
                    note="BM25 − grad_cos: MRR claimed > 0, tail-patch claimed < 0.")
    for _, r in _pairs(frame, ["mrr", "tail_patch"], "bm25", "grad_cos").iterrows():
        found.effects.append(Effect(r["task"], f"{r['metric']}: BM25 − grad_cos", r["diff"],
                                    r["lo"], r["hi"], "> 0" if r["metric"] == "mrr" else "< 0"))
    return found


def _sizes(frame: pd.DataFrame, key: str) -> list[tuple[float, str]]:
    """The task variants of a size sweep, ``(size, label)`` by size (``facts[model.width=64]``)."""
    out = []
    for label in frame["task"].unique():
        found = re.search(rf"{re.escape(key)}=([0-9.e+-]+)", label)
        if found:
            out.append((float(found.group(1)), label))
    return sorted(out)


def sparsity_with_scale(frame: pd.DataFrame, key: str) -> Finding:
    found = Finding("Influence becomes sparser as models grow", "Grosse et al. 2023 (§5.2)",
                    "tda-bench experiment=model_scale",
                    note=f"EK-FAC's top1pct_share (the share of |score| held by the top 1 % of "
                         f"documents), largest − smallest {key}, paired by seed and query; "
                         "claimed > 0.")
    sizes = _sizes(frame, key)
    if len(sizes) >= 2:
        (small, a), (large, b) = sizes[0], sizes[-1]
        diff = _paired(frame, (b, "ekfac"), (a, "ekfac"), "top1pct_share")
        if diff.size:
            value, lo, hi = _interval(diff, a, b, "sparsity")
            found.effects.append(Effect(f"facts, {key} {small:g} → {large:g}",
                                        "top1pct_share: large − small", value, lo, hi))
    return found


def alignment_with_scale(frame: pd.DataFrame, key: str) -> Finding:
    found = Finding("Influence aligns more with attribution as models grow",
                    "Chang et al. 2024 (§6)", "tda-bench experiment=model_scale",
                    note=f"the tail-patch of BM25's documents (those that state the fact) minus "
                         f"grad_cos's, at the largest {key} minus at the smallest, paired by "
                         "seed and query; claimed > 0.")
    sizes = _sizes(frame, key)
    if len(sizes) >= 2:
        (small, a), (large, b) = sizes[0], sizes[-1]
        gap_large = _paired(frame, (b, "bm25"), (b, "grad_cos"), "tail_patch")
        gap_small = _paired(frame, (a, "bm25"), (a, "grad_cos"), "tail_patch")
        if gap_large.size and gap_small.shape == gap_large.shape:
            value, lo, hi = _interval(gap_large - gap_small, a, b, "alignment")
            found.effects.append(Effect(f"facts, {key} {small:g} → {large:g}",
                                        "(BM25 − grad_cos tail-patch): large − small",
                                        value, lo, hi))
    return found


def _frame(directory: Path | None) -> pd.DataFrame:
    """The labelled runs under ``directory`` (none when it does not exist)."""
    if directory is None or not Path(directory).is_dir():
        return pd.DataFrame(columns=["task", "estimator", "seed", "run"])
    return label_runs(collect([directory]))


def findings(leaderboard: Path | None, scale: Path | None, key: str) -> list[Finding]:
    board, sweep = _frame(leaderboard), _frame(scale)
    return [ekfac_vs_lissa(board), sparsity_with_scale(sweep, key), order_flip(board),
            trackstar_vs_grad_cos(board), attribution_vs_influence(board),
            alignment_with_scale(sweep, key)]


def markdown(found: list[Finding], argv: list[str]) -> str:
    lines = ["# The seed papers' findings, measured", "",
             "<!-- Generated by python -m studies.findings from committed records; rebuild, "
             "do not edit. -->", "",
             f"Built with `python -m studies.findings {' '.join(argv)}`. Each effect is a mean "
             f"over seeds with its 95 % interval (two-way bootstrap over seeds and queries, "
             f"{N_BOOT} resamples, paired where the sides share seeds and queries).", "",
             "| # | claim | paper | experiment | verdict |", "|---|---|---|---|---|"]
    for i, f in enumerate(found, 1):
        lines.append(f"| {i} | {f.claim} | {f.paper} | `{f.command}` | **{f.verdict}** |")
    for i, f in enumerate(found, 1):
        lines += ["", f"## {i}. {f.claim}", "", f.note, "",
                  "| where | effect | value [95 % CI] | claimed | holds |", "|---|---|---|---|---|"]
        lines += [f"| {e.where} | {e.what} | {e.value:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}] | "
                  f"{e.claim} | {'yes' if e.holds else 'no'} |" for e in f.effects]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaderboard", type=Path, default=Path("results/records/leaderboard"))
    parser.add_argument("--scale", type=Path, default=Path("results/records/model_scale"))
    parser.add_argument("--scale-key", default="model.width")
    parser.add_argument("--out", type=Path, default=Path("results/FINDINGS.md"))
    args = parser.parse_args(argv)
    shown = ["--leaderboard", str(args.leaderboard), "--scale", str(args.scale),
             "--scale-key", args.scale_key, "--out", str(args.out)]
    text = markdown(findings(args.leaderboard, args.scale, args.scale_key), shown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
