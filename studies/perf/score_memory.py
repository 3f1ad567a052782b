"""Scoring peak memory against n_train: streamed gradient scoring stays flat.

Each training-set size runs in a fresh process (``--child``): it builds a synthetic
classification problem on a wide MLP (``d_in -> width -> 10``, random data), records the
peak resident memory after setup (the baseline), scores with a gradient estimator, and
reports the peak above that baseline. At the default sizes the ``[n_train, P]`` gradient
matrix that a non-streaming scorer would hold takes 1.1 GB and 4.4 GB.

    python -m studies.perf.score_memory             # n = 512, 2,048; no budget and 128 MB
    python -m studies.perf.score_memory --budgets 0 --out results/perf.md

``--out`` replaces this script's section of a markdown file (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SECTION = "score-memory"


def child(n_train: int, args: argparse.Namespace) -> dict:
    """Runs in a fresh process: setup, baseline, score, peak."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from bench.record import peak_rss_mb
    from estimators.grad_cos import GradCos
    from estimators.grad_dot import GradDot
    from estimators.memory import Budget
    from estimators.problem import AttributionProblem
    from tasks.digits import logits_of, margin, per_example_ce, sample_labels

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(args.d_in, args.width), nn.ReLU(), nn.Linear(args.width, 10))

    def data(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, args.d_in, generator=gen),
                             torch.randint(0, 10, (n,), generator=gen))

    problem = AttributionProblem(
        model=model, train=data(n_train), queries=data(args.n_queries), collate_fn=None,
        outputs=logits_of, loss=per_example_ce, measure=margin, sample_targets=sample_labels,
        l2=0.0, checkpoints=[])
    estimator = {"grad_dot": GradDot, "grad_cos": GradCos}[args.estimator](
        chunk_size=args.chunk_size)
    if args.memory_budget_mb:
        estimator.memory_budget = Budget(args.memory_budget_mb)
    params = estimator.engine(problem).num_params
    baseline = peak_rss_mb()
    start = time.perf_counter()
    estimator.fit(problem)
    scores = estimator.score(problem)
    seconds = time.perf_counter() - start
    assert scores.shape == (args.n_queries, n_train) and torch.isfinite(scores).all()
    return {"n_train": n_train, "params": params, "chunk_size": estimator.chunk_size,
            "full_gradients_gb": n_train * params * 4 / 1e9, "baseline_mb": baseline,
            "peak_above_baseline_mb": peak_rss_mb() - baseline, "seconds": seconds}


def measure(sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """One fresh process per size; their JSON results (``args.memory_budget_mb`` set)."""
    out = []
    for n in sizes:
        command = [sys.executable, "-m", "studies.perf.score_memory", "--child", str(n),
                   *forwarded(args)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        out.append({**json.loads(result.stdout.strip().splitlines()[-1]),
                    "budget": args.memory_budget_mb})
        print(out[-1], file=sys.stderr, flush=True)
    return out


def forwarded(args: argparse.Namespace) -> list[str]:
    keys = ["d_in", "width", "n_queries", "chunk_size", "estimator", "threads",
            "memory_budget_mb"]
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def growth(rows: list[dict]) -> str:
    ratio = rows[-1]["peak_above_baseline_mb"] / max(rows[0]["peak_above_baseline_mb"], 1e-9)
    budget = f"budget {rows[0]['budget']:g} MB" if rows[0]["budget"] else "no budget"
    return (f"{budget}: peak growth from n = {rows[0]['n_train']} to {rows[-1]['n_train']}: "
            f"**{100 * (ratio - 1):+.1f} %**")


def row(r: dict) -> str:
    budget = f"{r['budget']:g}" if r["budget"] else "—"
    return (f"| {budget} | {r['n_train']} | {r['params']:,} | {r['chunk_size']} | "
            f"{r['full_gradients_gb']:.1f} GB | {r['peak_above_baseline_mb']:.0f} MiB | "
            f"{r['seconds']:.1f} |")


def table(groups: list[list[dict]], args: argparse.Namespace) -> str:
    rows = [r for group in groups for r in group]
    lines = [
        f"<!-- {SECTION} -->",
        "## Scoring peak memory vs n_train (streamed gradients)",
        "",
        f"`python -m studies.perf.score_memory --estimator {args.estimator} --chunk-size "
        f"{args.chunk_size} --budgets {' '.join(f'{b:g}' for b in args.budgets)}`: a "
        f"{args.d_in}-{args.width}-10 MLP on random data, {args.n_queries} queries, "
        f"{args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; each "
        "size in a fresh process; peak resident memory (ru_maxrss) above the peak after "
        "setup (`memory_budget_mb` lowers the chunk size).",
        "",
        "| budget MB | n_train | P | chunk | [n_train, P] float32 | peak above baseline "
        "| score s |",
        "|---|---|---|---|---|---|---|",
        *[row(r) for r in rows],
        "",
        *[f"- {growth(group)}" for group in groups],
        f"<!-- /{SECTION} -->",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--n-queries", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.0, 128.0],
                        help="memory_budget_mb values to run (0: none, chunk_size as given)")
    parser.add_argument("--memory-budget-mb", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--estimator", choices=["grad_dot", "grad_cos"], default="grad_dot")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    groups = []
    for budget in args.budgets:
        args.memory_budget_mb = budget
        groups.append(measure(args.sizes, args))
    section = table(groups, args)
    print(section)
    if args.out:
        from studies.perf.ground_truth_speed import write_section

        write_section(args.out, section, SECTION)


if __name__ == "__main__":
    main()
