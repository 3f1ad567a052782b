"""Ground-truth retraining speed: vectorised ensemble vs sequential Lightning fits.

Trains the LDS models of ``digits_mlp`` or ``digits_cnn`` (``--task``; default configs: 1,000
training examples, subsets of half, a 64-64-10 MLP or the 1-8-16 channel CNN, SGD with
momentum, 20 epochs at batch 32) both ways, in one process with a fixed thread count, and
reports models per minute and their ratio at each ensemble
size M. The sequential path's cost per model does not depend on M, so at large M it is timed
on the first ``--sequential-max`` models only (the table says how many). The models trained
both ways are compared (max |Δf| over their query measurements).

    python -m studies.perf.ground_truth_speed                       # M = 16, 64, 256
    python -m studies.perf.ground_truth_speed --sizes 16 --out results/perf.md
    python -m studies.perf.ground_truth_speed --task digits_cnn --sizes 64 --out results/perf.md

``--out`` replaces this script's section for the task in a markdown file (other sections
are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import torch

from tasks.digits import DigitsTask
from tasks.digits_cnn import DigitsCNN
from tasks.digits_mlp import DigitsMLP

SECTION = "ground-truth-speed"
RETRAIN_SEED_BASE = 10_000  # as bench.ground_truth
COMMON = dict(n_train=1000, n_queries=100, l2=1e-4, batch_size=32, epochs=20,
              optim={"lr": 0.05, "momentum": 0.9})
TASKS = {  # name -> (the task as its default config, its description)
    "digits_mlp": (lambda: DigitsMLP(hidden=[64], **COMMON), "64-64-10 MLP"),
    "digits_cnn": (lambda: DigitsCNN(channels=[8, 16], **COMMON),
                   "CNN 1-8-16 channels, 3×3 stride-2 convolutions, linear head"),
}


def lds_units(n_train: int, fraction: float, count: int) -> tuple[list[int], list[torch.Tensor]]:
    """Seeds and subsets of ``count`` LDS units (two seeds per subset, as the default config)."""
    gen = torch.Generator().manual_seed(0)
    size = int(round(fraction * n_train))
    subsets = [torch.randperm(n_train, generator=gen)[:size].sort().values
               for _ in range((count + 1) // 2)]
    seeds = [RETRAIN_SEED_BASE + (u % 2) for u in range(count)]
    return seeds, [subsets[u // 2] for u in range(count)]


def time_sequential(task: DigitsTask, seeds, subsets) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    values = []
    for seed, subset in zip(seeds, subsets, strict=True):
        model = task.build_model(seed)
        task.fit(model, seed=seed, indices=subset)
        values.append(task.measure_queries(model))
    return time.perf_counter() - start, torch.stack(values)


def time_vectorised(task: DigitsTask, seeds, subsets) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    values = task.fit_many(seeds, subsets)
    return time.perf_counter() - start, values


def section_name(task_name: str) -> str:
    """The markdown section of a task (digits_mlp keeps the original name)."""
    return SECTION if task_name == "digits_mlp" else f"{SECTION}-{task_name}"


def run(sizes: list[int], sequential_max: int, threads: int,
        task_name: str = "digits_mlp") -> str:
    torch.set_num_threads(threads)
    make, description = TASKS[task_name]
    task = make()
    load_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    time_vectorised(task, *lds_units(task.n_train, 0.5, 2))  # warm-up (imports, first calls)
    rows = []
    for m in sizes:
        seeds, subsets = lds_units(task.n_train, 0.5, m)
        k = min(m, sequential_max)
        t_seq, f_seq = time_sequential(task, seeds[:k], subsets[:k])
        t_vec, f_vec = time_vectorised(task, seeds, subsets)
        seq_rate, vec_rate = 60 * k / t_seq, 60 * m / t_vec
        diff = (f_vec[:k] - f_seq).abs().max().item()
        rows.append(f"| {m} | {k} | {t_seq:.1f} | {seq_rate:.0f} | {t_vec:.1f} | "
                    f"{vec_rate:.0f} | **{vec_rate / seq_rate:.1f}×** | {diff:.1e} |")
        print(rows[-1], flush=True)
    name = section_name(task_name)
    load_end = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    title = "" if task_name == "digits_mlp" else f" ({task_name})"
    header = [
        f"<!-- {name} -->",
        f"## Ground-truth retraining: vectorised vs sequential{title}",
        "",
        f"`python -m studies.perf.ground_truth_speed --task {task_name} --threads {threads}` on "
        f"`{task_name}` (1,000 train, LDS subsets of 500, {description}, SGD momentum 0.9, "
        f"20 epochs × 16 steps), torch {torch.__version__.split('+')[0]}, "
        f"{platform.processor() or platform.machine()}, {threads} thread(s), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load_start} "
        f"(1 / 5 / 15 min) at start and {load_end} at the end. "
        "Sequential = one Lightning `Trainer.fit` per model (`task.fit`); vectorised = "
        "`task.fit_many` (one Lightning fit of the stacked ensemble). Both include "
        "building the models and measuring the 100 queries. max |Δf|: largest difference "
        "of a query measurement between the two paths (same seeds and subsets).",
        "",
        "| M | sequential fits timed | sequential s | sequential models/min | vectorised s "
        "| vectorised models/min | speed-up | max \\|Δf\\| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join([*header, *rows, f"<!-- /{name} -->", ""])


def write_section(path: Path, section: str, name: str = SECTION) -> None:
    """Replaces the section ``name`` of ``path`` (or appends it)."""
    text = path.read_text() if path.exists() else "# Performance benchmarks\n\n"
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="digits_mlp")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--sequential-max", type=int, default=64,
                        help="time at most this many sequential fits per size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args()
    section = run(args.sizes, args.sequential_max, args.threads, args.task)
    print(section)
    if args.out:
        write_section(args.out, section, section_name(args.task))


if __name__ == "__main__":
    main()
