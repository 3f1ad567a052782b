"""Fit and score cost of every estimator, at two training-set sizes per task.

For each (task, size) a private cache is warmed first: one ``python -m bench`` run with
``estimator=random`` trains the attributed model (seed 0) and computes the ground truth, and,
when TRAK is measured, runs of seeds 1 … n_models − 1 train its ensemble members. Then each
estimator runs ONCE in a fresh ``python -m bench`` subprocess (``logger=none num_threads=1``,
``OMP_NUM_THREADS=1``, seed 0) whose cache links the warm models and ground truth but starts
with no estimator caches (EK-FAC/K-FAC factors, gradient indexes), so the recorded
``fit_seconds``, ``score_seconds`` and ``peak_rss_mb`` (from ``metrics.json``) are the
estimator's own cost. An estimator that refuses the task (exit status 2) is reported as
"n/a (reason)"; one that runs past ``--timeout`` as "> T s" (and is not run at the larger
size of that task).

    python -m studies.perf.estimator_cost --out results/perf.md
    python -m studies.perf.estimator_cost --tasks digits_mlp --sizes 500 1000 --estimators ekfac

``--out`` replaces this script's section of a markdown file (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import CONF_DIR as CONF
from studies.common import Result, run_bench

SECTION = "estimator-cost"
CONF_DIR = Path(CONF)
# What sets the training-set size, and the default two sizes (digits: 1,797 images, 100 of
# them queries; facts: the default world and one with twice the people).
SIZE_KEY = {"digits_mlp": "task.n_train", "digits_mlp_noisy": "task.n_train",
            "digits_logreg": "task.n_train", "facts": "task.world.n_entities"}
DEFAULT_SIZES = {"digits_mlp": [500, 1000], "facts": [150, 300]}
# Off: work that is no cost of the estimator (PBRF ground truth; the tail-patch metric).
TASK_OVERRIDES = {"digits_mlp": ["task.pbrf=null"], "digits_logreg": ["task.pbrf=null"],
                  "facts": ["fact_metrics.with_tail_patch=false"]}
COMMON = ["logger=none", "num_threads=1", "seed=0", "progress=false"]


def estimator_names(conf_dir: Path = CONF_DIR) -> list[str]:
    """Every estimator config (``conf/estimator/*.yaml``), sorted."""
    return sorted(p.stem for p in (conf_dir / "estimator").glob("*.yaml"))


def trak_models(conf_dir: Path = CONF_DIR) -> int:
    """TRAK's default ensemble size (``n_models`` of ``conf/estimator/trak.yaml``)."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(conf_dir / "estimator" / "trak.yaml").get("n_models", 1))


def without_keys(overrides: list[str], keys: set[str]) -> list[str]:
    """``overrides`` less those that set one of ``keys`` (so the size given here wins)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys]


def warm_up(task_overrides: list[str], cache: Path, work: Path, timeout: float,
            ensemble: int) -> Result:
    """Trains the model(s) and computes the ground truth of one (task, size) into ``cache``."""
    base = [*task_overrides, *COMMON, "estimator=random", "save_scores=true"]
    result = run_bench(base, work / "warm-seed0", cache, timeout)
    if result.status != "ok":
        raise RuntimeError(f"warm-up run failed ({result.reason}); run `python -m bench "
                           f"{' '.join(base)}` to see why.")
    for seed in range(1, ensemble):  # TRAK's ensemble members: trained here, not in its fit
        extra = run_bench([*base, f"seed={seed}", "save_scores=false"],
                          work / f"warm-seed{seed}", cache, timeout)
        if extra.status != "ok":
            raise RuntimeError(f"warm-up of seed {seed} failed ({extra.reason}).")
        result.wall += extra.wall
    return result


def timed_run(task_overrides: list[str], estimator: str, cache: Path, work: Path,
              timeout: float) -> Result:
    """One estimator in a fresh process, with warm models and ground truth but cold factor
    and gradient-index caches."""
    run_cache = work / f"cache-{estimator}"
    shutil.rmtree(run_cache, ignore_errors=True)
    run_cache.mkdir(parents=True)
    for name in ("models", "ground_truth"):
        (cache / name).mkdir(parents=True, exist_ok=True)
        (run_cache / name).symlink_to((cache / name).resolve(), target_is_directory=True)
    try:
        return run_bench([*task_overrides, *COMMON, f"estimator={estimator}",
                          "save_scores=false"], work / f"run-{estimator}", run_cache, timeout)
    finally:
        shutil.rmtree(run_cache, ignore_errors=True)


def measure(tasks: list[str], sizes: dict[str, list[int]], estimators: list[str],
            overrides: list[str], cache_root: Path, timeout: float, log=print) -> list[dict]:
    """Rows ``{task, size, n_train, n_queries, estimator, result}`` for every combination."""
    rows = []
    ensemble = trak_models() if "trak" in estimators else 1
    for task in tasks:
        key = SIZE_KEY[task]
        timed_out: dict[str, int] = {}
        for size in sorted(sizes[task]):
            task_overrides = [f"task={task}", *without_keys(overrides, {key}),
                              *TASK_OVERRIDES.get(task, []), f"{key}={size}"]
            cache = cache_root / f"{task}-{size}"
            work = cache_root / "runs" / f"{task}-{size}"
            shutil.rmtree(work, ignore_errors=True)
            warm = warm_up(task_overrides, cache, work, timeout * max(ensemble, 4), ensemble)
            log(f"{task} {key}={size}: n_train {warm.n_train}, warm-up {warm.wall:.0f} s")
            for estimator in estimators:
                if estimator in timed_out:
                    result = Result("skipped", reason=f"> {timeout:g} s at n_train "
                                                      f"{timed_out[estimator]}")
                else:
                    result = timed_run(task_overrides, estimator, cache, work, timeout)
                    if result.status == "timeout":
                        timed_out[estimator] = warm.n_train
                rows.append({"task": task, "size": size, "n_train": warm.n_train,
                             "n_queries": warm.n_queries, "estimator": estimator,
                             "result": result})
                log(f"  {estimator}: {cells(result)} (wall {result.wall:.0f} s)")
    return rows


def cells(result: Result) -> str:
    """``fit s | score s | peak RSS MB | wall s`` of one result."""
    if result.status == "ok":
        r = result.record
        return (f"{r['fit_seconds']:.2f} | {r['score_seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                f"{result.wall:.0f}")
    label = {"na": "n/a", "timeout": "timed out", "skipped": "not run",
             "error": "error"}[result.status]
    reason = result.reason.replace("|", "/")
    if len(reason) > 140:
        reason = reason[:137] + "..."
    wall = f"{result.wall:.0f}" if result.wall else "–"
    return f"{label} ({reason}) | – | – | {wall}"


def growth(rows: list[dict]) -> list[str]:
    """Per task: how fit + score seconds grew from the smallest to the largest n_train."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        ok = [r for r in rows if r["task"] == task and r["result"].status == "ok"]
        if len({r["n_train"] for r in ok}) < 2:
            continue
        low, high = min(r["n_train"] for r in ok), max(r["n_train"] for r in ok)
        parts = []
        for estimator in dict.fromkeys(r["estimator"] for r in ok):
            total = {r["n_train"]: r["result"].record["fit_seconds"]
                     + r["result"].record["score_seconds"]
                     for r in ok if r["estimator"] == estimator}
            if low in total and high in total and total[low] >= 0.05:
                parts.append(f"{estimator} ×{total[high] / total[low]:.1f}")
        if parts:
            lines.append(f"- {task}, fit + score s from n_train {low} to {high} "
                         f"(×{high / low:.2f}): {', '.join(parts)}.")
    return lines


def ekfac_throughput(rows: list[dict]) -> list[str]:
    """Train examples per second of EK-FAC's factor fit and of its scoring, per size."""
    lines = []
    for row in rows:
        result = row["result"]
        if row["estimator"] != "ekfac" or result.status != "ok":
            continue
        fit, score = result.record["fit_seconds"], result.record["score_seconds"]
        lines.append(
            f"- EK-FAC on {row['task']} (n_train {row['n_train']}): scoring "
            f"**{row['n_train'] / max(score, 1e-9):,.0f} train examples/s** against "
            f"{row['n_queries']} queries ({score:.1f} s); factor fit (covariances, "
            f"eigendecomposition, eigenvalue correction: two passes over the training set) "
            f"{row['n_train'] / max(fit, 1e-9):,.0f} examples/s ({fit:.1f} s).")
    return lines


def table(rows: list[dict], command: str, started: str, load: tuple, load_end: tuple,
          timeout: float) -> str:
    import torch

    sizes = {}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for row in rows:
        sizes.setdefault(row["task"], []).append(
            f"{SIZE_KEY[row['task']]}={row['size']} → n_train {row['n_train']}")
    size_text = "; ".join(f"{t}: {', '.join(dict.fromkeys(s))}" for t, s in sizes.items())
    lines = [
        f"<!-- {SECTION} -->",
        "## Estimator cost: fit and score seconds, peak memory",
        "",
        f"`{command}`, {started}, torch {torch.__version__.split('+')[0]}, load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) at start and "
        f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} at the end, on a shared "
        "2-core machine (other jobs running: read the seconds as rough, ratios within one "
        f"size as firmer). Sizes: {size_text}.",
        "",
        "Each estimator ran once with its default config in a fresh `python -m bench` process "
        "(`logger=none num_threads=1`, `OMP_NUM_THREADS=1`, seed 0) on a warm model and ground "
        "truth and cold estimator caches (no cached factors or gradient index). fit s and score "
        "s are `fit_seconds` and `score_seconds` of metrics.json; peak RSS is the process's "
        "peak resident memory during fit + score (it includes Python, the libraries, the "
        "loaded model and data: the `random` row is that floor); wall s is the whole subprocess "
        "(imports, loading, metrics). "
        + ("TRAK's ensemble members were trained in the warm-up, so its fit is gradients "
           "only. " if any(r["estimator"] == "trak" for r in rows) else "")
        + f"Timeout {timeout:g} s per run. Task overrides: "
        + "; ".join(f"{t}: `{' '.join(o)}`" for t, o in TASK_OVERRIDES.items() if t in sizes)
        + ".",
        "",
        "| task | n_train | estimator | fit s | score s | peak RSS MB | wall s |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['task']} | {r['n_train']} | {r['estimator']} | {cells(r['result'])} |"
          for r in sorted(rows, key=lambda r: (tasks.index(r["task"]), r["estimator"],
                                               r["n_train"]))],
        "",
        *growth(rows),
        *ekfac_throughput(rows),
        f"<!-- /{SECTION} -->",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_mlp", "facts"],
                        choices=sorted(SIZE_KEY))
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="sizes for every task (default: digits_mlp n_train 500 1000, "
                             "facts world.n_entities 150 300)")
    parser.add_argument("--estimators", nargs="+", default=None,
                        help="default: every conf/estimator/*.yaml")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra Hydra overrides for every run (e.g. a tiny task)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per timed run")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="private cache (default: $TDA_BENCH_CACHE/estimator-cost, or a "
                             "temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)
    estimators = args.estimators or estimator_names()
    unknown = sorted(set(estimators) - set(estimator_names()))
    if unknown:
        parser.error(f"no conf/estimator/<name>.yaml for {unknown}")
    sizes = {t: args.sizes or DEFAULT_SIZES.get(t) for t in args.tasks}
    missing = [t for t, s in sizes.items() if not s]
    if missing:
        parser.error(f"give --sizes for {missing} (no default sizes)")
    if args.cache_dir is None:
        root = os.environ.get("TDA_BENCH_CACHE")
        args.cache_dir = (Path(root) / "estimator-cost" if root
                          else Path(tempfile.mkdtemp(prefix="estimator-cost-")))
    command = " ".join(["python -m studies.perf.estimator_cost",
                        *(argv if argv is not None else sys.argv[1:])])
    load = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"load average at start: {load}", file=sys.stderr, flush=True)
    rows = measure(args.tasks, sizes, estimators, args.override, args.cache_dir.resolve(),
                   args.timeout, log=lambda s: print(s, file=sys.stderr, flush=True))
    section = table(rows, command, started, load, os.getloadavg(), args.timeout)
    print(section)
    if args.out:
        from studies.perf.ground_truth_speed import write_section

        write_section(args.out, section, SECTION)
    return section


if __name__ == "__main__":
    main()
