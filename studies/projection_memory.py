"""Peak memory of projected gradient scoring: it grows with chunk size and d, not n_train.

Each configuration runs in a fresh Python process: it builds a synthetic wide MLP (about
1.3 M tracked parameters, so materialising the ``[n_train, P]`` float32 gradients would take
≥ 1 GB at every size measured), a lazily generated training set and the queries, runs one
warm-up forward and backward pass, records the resident set size (the post-setup baseline),
then scores the whole training set with projected ``grad_dot`` (no on-disk index, so every
gradient is streamed) and reports the peak RSS above the baseline (``ru_maxrss``).

    python -m studies.projection_memory                 # writes results/projection_memory.md
    python -m studies.projection_memory --n 256 --quick # one size pair, kronecker only

Run with ``OMP_NUM_THREADS=1`` on a quiet machine for stable timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

WIDTHS = (256, 1024, 1024, 10)
N_QUERIES = 8
NOTE = (
    "\nKronecker never forms a per-example gradient (working memory: chunk × activations and "
    "projected factors); dense forms one layer's per-example gradients at a time, O(chunk × "
    "largest layer). Neither grows with n_train: only the [n_queries, n_train] score matrix "
    "does. Seconds are wall-clock on the machine that ran it and vary with its load.\n")


def current_rss_mb() -> float:
    """The process's resident set size now, from /proc (MiB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n_train: int, dim: int, chunk: int, structure: str) -> dict:
    """Scores ``n_train`` synthetic examples in this process; returns the memory figures."""
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from estimators.grad_dot import GradDot
    from estimators.gradients import GradientEngine
    from estimators.problem import AttributionProblem, cross_entropy_sum

    class Synthetic(Dataset):
        """Example i is generated from seed i on access: nothing grows with n."""

        def __init__(self, n: int, offset: int):
            self.n, self.offset = n, offset

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int):
            gen = torch.Generator().manual_seed(self.offset + i)
            x = torch.randn(WIDTHS[0], generator=gen)
            return x, int(torch.randint(0, WIDTHS[-1], (1,), generator=gen))

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers)

    def collate(items):
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def make_problem(n: int) -> AttributionProblem:
        return AttributionProblem(
            model=model, train=Synthetic(n, 0), queries=Synthetic(N_QUERIES, 10**9),
            collate_fn=collate, outputs=lambda m, b: m(b[0]),
            loss=lambda o, b: cross_entropy_sum(o, b[1]),
            measure=lambda o, b: -cross_entropy_sum(o, b[1]))

    params = GradientEngine(model).num_params
    estimator = GradDot(projection_dim=dim, chunk_size=chunk, projection_structure=structure)
    problem = make_problem(n_train)
    x, y = collate([problem.train[i] for i in range(2)])  # warm-up: autograd, thread pools
    cross_entropy_sum(model(x), y).sum().backward()
    model.zero_grad(set_to_none=True)
    baseline = current_rss_mb()
    start = time.perf_counter()
    scores = estimator.score(problem)
    seconds = time.perf_counter() - start
    assert scores.shape == (N_QUERIES, n_train) and torch.isfinite(scores).all()
    return {"n_train": n_train, "dim": dim, "chunk": chunk, "structure": structure,
            "params": params, "dense_gb": n_train * params * 4 / 1e9,
            "baseline_mb": baseline, "peak_above_baseline_mb": peak_rss_mb() - baseline,
            "seconds": seconds}


def measure(n_train: int, dim: int, chunk: int, structure: str) -> dict:
    """Runs :func:`child` in a fresh interpreter and returns its JSON result."""
    cmd = [sys.executable, "-m", "studies.projection_memory", "--child", str(n_train), str(dim),
           str(chunk), structure]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| structure | d | chunk | n_train | [n_train, P] float32 (GB) | peak above "
             "baseline (MiB) | growth n→4n | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    by_key: dict[tuple, float] = {}
    for r in rows:
        key = (r["structure"], r["dim"], r["chunk"])
        growth = ""
        if key in by_key:
            growth = f"{100 * (r['peak_above_baseline_mb'] / by_key[key] - 1):+.1f} %"
        else:
            by_key[key] = r["peak_above_baseline_mb"]
        lines.append(f"| {r['structure']} | {r['dim']} | {r['chunk']} | {r['n_train']} | "
                     f"{r['dense_gb']:.2f} | {r['peak_above_baseline_mb']:.1f} | {growth} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("N", "DIM", "CHUNK", "STRUCTURE"))
    parser.add_argument("--n", type=int, default=256, help="the smaller training-set size n")
    parser.add_argument("--quick", action="store_true", help="kronecker, d=512, chunk 32 only")
    parser.add_argument("--out", default="results/projection_memory.md")
    args = parser.parse_args()
    if args.child:
        n, dim, chunk, structure = args.child
        print(json.dumps(child(int(n), int(dim), int(chunk), structure)))
        return
    configs = [("kronecker", 512, 32)]
    if not args.quick:
        configs += [("kronecker", 2048, 32), ("kronecker", 512, 128), ("dense", 512, 128)]
    rows = []
    for structure, dim, chunk in configs:
        for n in (args.n, 4 * args.n):
            rows.append(measure(n, dim, chunk, structure))
            print(json.dumps(rows[-1]), flush=True)
    text = (
        "# Peak memory of projected scoring vs n_train\n\n"
        "Produced by `python -m studies.projection_memory` (each row a fresh process; peak RSS "
        "above the post-setup baseline while scoring the whole training set with projected "
        f"`grad_dot`, no index). Model: MLP {'-'.join(map(str, WIDTHS))}, "
        f"{rows[0]['params']:,} tracked parameters; {N_QUERIES} queries. "
        f"Machine: {platform.machine()}, Python {platform.python_version()}.\n\n"
        + table(rows) + "\n" + NOTE)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
