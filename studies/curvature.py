"""The curvature benchmark: a small-scale reproduction of Grosse et al. 2023, Figs. 6-7.

    python -m studies.curvature            # full: digits_mlp + digits_logreg, seeds 0 1 2
    python -m studies.curvature --quick    # tiny tasks, one seed: checks the script in a minute

Runs explicit, ekfac, kfac, lissa, arnoldi and grad_dot (those whose
``conf/estimator/<name>.yaml`` exists; the others are reported as skipped) on ``digits_mlp``
and ``digits_logreg`` through the harness (``python -m bench`` subprocesses, so each run's
peak memory is its own), and writes ``results/curvature.md``:

1. LiSSA's depth: the smallest depth of a grid whose inverse-HVPs of the query gradients
   reach mean cosine ≥ 0.99 to ``explicit``'s (GGN, same damping) on ``digits_mlp``; every
   LiSSA run then uses it.
2. Per task and estimator (mean ± std over seeds): LDS, LOO and PBRF correlations, the
   correlation with ``explicit``'s scores (mean over queries of the Pearson correlation of
   score rows), fit and score seconds, peak memory.
3. The EK-FAC / LiSSA median time ratio (fit + score) over 3 interleaved runs with
   ``OMP_NUM_THREADS=1`` (Grosse et al.'s claim: ≤ 0.2), and whether EK-FAC's LDS and PBRF
   correlation lie within (or above) LiSSA's paired-bootstrap 95 % interval on ``digits_mlp``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.cli import CONF_DIR  # noqa: E402
from studies.common import compose, run_bench, trained_problem  # noqa: E402

ESTIMATORS = ["explicit", "ekfac", "kfac", "lissa", "arnoldi", "grad_dot"]
TASKS = ["digits_mlp", "digits_logreg"]
DEPTHS = [250, 500, 1000, 1500, 2000, 3000]
QUICK = {
    "digits_mlp": ["task.n_train=120", "task.n_queries=12", "task.epochs=3", "task.lds.subsets=8",
                   "task.lds.seeds=1", "task.pbrf.n=6"],
    "digits_logreg": ["task.n_train=120", "task.n_queries=12", "task.lds.subsets=8",
                      "task.loo.n=10", "task.pbrf.n=6"],
}
MARKER = "DEPTH-SEARCH "
METRICS = ["lds", "loo_pearson", "loo_spearman", "pbrf_pearson", "pbrf_spearman",
           "explicit_corr", "fit_seconds", "score_seconds", "peak_rss_mb"]


def available(names: list[str]) -> tuple[list[str], list[str]]:
    """Estimators whose config exists, and those skipped."""
    have = [n for n in names if (Path(CONF_DIR) / "estimator" / f"{n}.yaml").exists()]
    return have, [n for n in names if n not in have]


def bench_run(task: str, estimator: str, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    """One ``python -m bench`` job; returns its metrics, per-query table and scores."""
    command = [f"task={task}", f"estimator={estimator}", f"seed={seed}", "logger=none",
               "progress=false", "num_threads=1", *overrides]
    done = run_bench(command, run_dir)
    if done.status != "ok":
        raise RuntimeError(f"python -m bench {' '.join(command)} failed: {done.reason}")
    return {"metrics": done.record, "per_query": pd.read_csv(run_dir / "per_query.csv"),
            "scores": torch.load(run_dir / "scores.pt", weights_only=True)}


def depth_search(task_overrides: list[str], depths: list[int], seed: int = 0) -> dict:
    """LiSSA's cosine to explicit's inverse-HVPs on digits_mlp at each depth of the grid."""
    from hydra.utils import instantiate

    torch.set_num_threads(1)
    base = ["task=digits_mlp", f"seed={seed}", "progress=false", "logger=none", *task_overrides]
    explicit = instantiate(compose([*base, "estimator=explicit"]).estimator)
    problem, task, cfg = trained_problem([*base, "estimator=lissa"])
    explicit.fit(problem)
    engine = explicit.engine(problem)
    q = engine.flatten(engine.all_gradients(problem, "queries", 256))
    exact = torch.cholesky_solve(q.T.double(), explicit.cholesky).T
    lissa = instantiate(cfg.estimator, depth=max(depths))
    if lissa.damping != explicit.damping:
        raise ValueError("lissa and explicit must share the damping for the depth search")
    start = time.perf_counter()
    lissa.fit(problem)
    estimates = lissa.inverse_hvp(problem, engine, q, depths)
    seconds = time.perf_counter() - start
    rows = []
    for depth, h in estimates.items():
        cos = torch.nn.functional.cosine_similarity(h.double(), exact)
        rows.append({"depth": depth, "mean_cosine": float(cos.mean()),
                     "min_cosine": float(cos.min())})
    reached = [r["depth"] for r in rows if r["mean_cosine"] >= 0.99]
    return {"rows": rows, "depth": min(reached) if reached else max(depths),
            "reached": bool(reached), "seconds": seconds, "scale": lissa.scale_used}


def depth_search_subprocess(quick: bool) -> dict:
    """The depth search in its own process, so this one stays small: a child's peak RSS on
    Linux starts from its parent's size at fork, and would inflate every run's peak memory."""
    cmd = [sys.executable, "-m", "studies.curvature", "--depth-search-only"] + (
        ["--quick"] if quick else [])
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the LiSSA depth search failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARKER):])


def explicit_corr(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over queries of the Pearson correlation of two score rows ``[Q, N]``."""
    a = scores.double() - scores.double().mean(1, keepdim=True)
    b = reference.double() - reference.double().mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)).mean())


def bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap over (seed, query) pairs: LiSSA's (``a``) 95 % interval of the mean,
    EK-FAC's (``b``) mean, and the 95 % interval of the paired difference b − a."""
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    means_a, diffs = a[idx].mean(1), (b[idx] - a[idx]).mean(1)
    low, high = np.percentile(means_a, [2.5, 97.5])
    d_low, d_high = np.percentile(diffs, [2.5, 97.5])
    return {"lissa_mean": a.mean(), "lissa_low": low, "lissa_high": high, "ekfac_mean": b.mean(),
            "diff_low": d_low, "diff_high": d_high, "within_or_above": bool(b.mean() >= low)}


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "–"
    mean = float(np.mean(values))
    return f"{mean:.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny tasks, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=Path("results/curvature.md"))
    parser.add_argument("--workdir", type=Path, default=Path("outputs/curvature"))
    parser.add_argument("--timing-runs", type=int, default=3)
    parser.add_argument("--lissa-depth", type=int, default=None,
                        help="skip the depth search and use this LiSSA depth")
    parser.add_argument("--depth-search-only", action="store_true",
                        help="print the LiSSA depth search as JSON and stop")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    depths = [25, 50, 100, 200] if args.quick else DEPTHS
    overrides = {t: (QUICK[t] if args.quick else []) for t in TASKS}
    if args.depth_search_only:
        print(MARKER + json.dumps(depth_search(overrides["digits_mlp"], depths)), flush=True)
        return
    estimators, skipped = available(ESTIMATORS)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.workdir / stamp

    if args.lissa_depth is None:
        print("LiSSA depth search on digits_mlp ...", flush=True)
        search = depth_search_subprocess(args.quick)
    else:
        search = {"rows": [], "depth": args.lissa_depth, "reached": None, "seconds": None,
                  "scale": None}
    depth = search["depth"]
    lissa_override = [f"estimator.depth={depth}"]

    results: dict[str, dict[str, list[dict]]] = {t: {e: [] for e in estimators} for t in TASKS}
    for task in TASKS:
        for seed in seeds:
            for est in estimators:
                extra = lissa_override if est == "lissa" else []
                print(f"{task} / {est} / seed {seed}", flush=True)
                out = bench_run(task, est, seed, work / f"{task}-{est}-seed{seed}",
                                overrides[task] + extra)
                results[task][est].append(out)
            if "explicit" in estimators:
                reference = results[task]["explicit"][-1]["scores"]
                for est in estimators:
                    last = results[task][est][-1]
                    last["metrics"]["explicit_corr"] = explicit_corr(last["scores"], reference)

    timing = None
    if {"ekfac", "lissa"} <= set(estimators):
        ratios = []
        for r in range(args.timing_runs):
            secs = {}
            for est in ("ekfac", "lissa"):
                extra = lissa_override if est == "lissa" else []
                m = bench_run("digits_mlp", est, seeds[0], work / f"timing-{est}-{r}",
                              overrides["digits_mlp"] + extra)["metrics"]
                secs[est] = m["fit_seconds"] + m["score_seconds"]
            ratios.append(secs["ekfac"] / secs["lissa"])
        timing = {"ratios": ratios, "median": float(np.median(ratios))}

    write_report(args, seeds, estimators, skipped, search, results, timing)
    print(f"wrote {args.out}", flush=True)


def write_report(args, seeds, estimators, skipped, search, results, timing) -> None:
    lines = ["# Curvature estimators on the digits tasks (Grosse et al. 2023 Figs. 6-7, small)",
             "", f"Generated by `python -m studies.curvature{' --quick' if args.quick else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {seeds}; "
             "OMP_NUM_THREADS=1; every run is a `python -m bench` subprocess.", ""]
    if args.quick:
        lines += ["**Quick mode: tiny tasks (120 training examples), one seed. Not citable.**", ""]
    if skipped:
        lines += [f"Skipped (no config yet): {', '.join(skipped)}.", ""]
    lines += ["## LiSSA depth search (digits_mlp, seed 0, GGN, same damping as explicit)", ""]
    if search["reached"] is None:
        lines += [f"Not run: LiSSA depth {search['depth']} given by --lissa-depth.", ""]
    else:
        lines += [f"Scale s = {search['scale']:.4g}; {search['seconds']:.1f} s for the deepest "
                  "run.", "", "| depth | mean cosine | min cosine |", "|---|---|---|"]
        lines += [f"| {r['depth']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} |"
                  for r in search["rows"]]
        verdict = "reaches" if search["reached"] else "does NOT reach (deepest used)"
        lines += ["", f"LiSSA depth used below: **{search['depth']}** ({verdict} mean cosine "
                  "≥ 0.99).", ""]
    for task, by_est in results.items():
        lines += [f"## {task}", "", "| estimator | " + " | ".join(METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for est in estimators:
            runs = by_est[est]
            cells = [fmt([r["metrics"].get(k) for r in runs]) for k in METRICS]
            lines.append(f"| {est} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## EK-FAC against LiSSA on digits_mlp", ""]
    if timing is None:
        lines += ["Not run: ekfac or lissa is not available.", ""]
    else:
        ratio_text = ", ".join(f"{r:.3f}" for r in timing["ratios"])
        claim = "holds" if timing["median"] <= 0.2 else "does not hold"
        lines += [f"Time ratio EK-FAC / LiSSA (fit + score, OMP_NUM_THREADS=1): runs {ratio_text};"
                  f" median **{timing['median']:.3f}** (claim ≤ 0.2 {claim}).", ""]
        lines += ["| metric | LiSSA mean [95% CI] | EK-FAC mean | EK-FAC − LiSSA [95% CI] | "
                  "EK-FAC within or above |", "|---|---|---|---|---|"]
        for key in ("lds", "pbrf_pearson", "pbrf_spearman"):
            pair = [np.concatenate([r["per_query"][key].to_numpy()
                                    for r in results["digits_mlp"][e]])
                    if key in results["digits_mlp"][e][0]["per_query"] else None
                    for e in ("lissa", "ekfac")]
            if pair[0] is None or pair[1] is None:
                continue
            b = bootstrap(pair[0].astype(float), pair[1].astype(float))
            lines.append(f"| {key} | {b['lissa_mean']:.3f} [{b['lissa_low']:.3f}, "
                         f"{b['lissa_high']:.3f}] | {b['ekfac_mean']:.3f} | "
                         f"{b['ekfac_mean'] - b['lissa_mean']:+.3f} [{b['diff_low']:+.3f}, "
                         f"{b['diff_high']:+.3f}] | {'yes' if b['within_or_above'] else 'no'} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
