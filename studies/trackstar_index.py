"""How much cheaper is scoring new queries against a built TrackStar index?

Chang et al. 2024 build the training-side encodings once; a new query set then costs its own
gradients plus a pass over the d-dimensional index. This script builds the index of the
`facts` corpus (timing it), then scores 10 new queries against it (timing that), for each
projection structure, and writes ``results/trackstar_index.md``.

    OMP_NUM_THREADS=1 python -m studies.trackstar_index num_threads=1 [--structures kronecker dense]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import Subset

from estimators.trackstar import TrackStar
from studies.common import trained_problem


def facts_problem(overrides: list[str]):
    problem, _, cfg = trained_problem(["task=facts", "estimator=trackstar", *overrides])
    return problem, cfg


def measure(problem, structure: str, dim: int, n_new: int) -> dict:
    index_dir = tempfile.mkdtemp()
    kwargs = dict(projection_dim=dim, projection_structure=structure, index_dir=index_dir)
    start = time.perf_counter()
    TrackStar(**kwargs).score(problem)  # builds the index (and scores the task's queries)
    built = time.perf_counter() - start
    new = dataclasses.replace(problem, queries=Subset(problem.queries, list(range(n_new))))
    start = time.perf_counter()
    scores = TrackStar(**kwargs).score(new)
    scored = time.perf_counter() - start
    return {"structure": structure, "dim": dim, "build": built, "new": scored,
            "shape": tuple(scores.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", nargs="+", default=["kronecker"],
                        help="kronecker (the default) and/or dense (slow on facts)")
    parser.add_argument("--dim", type=int, default=4096, help="projection_dim (default 4096)")
    parser.add_argument("--new-queries", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/trackstar_index.md"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. num_threads=1")
    args = parser.parse_args()
    problem, _ = facts_problem(args.overrides)
    rows = [measure(problem, s, args.dim, args.new_queries) for s in args.structures]
    lines = ["# TrackStar: scoring new queries against a built index (`facts`)", "",
             f"Training corpus {problem.n_train} documents; index of d = {args.dim} encodings "
             "(optimizer-corrected, projected); `hessian: mixed` (R from the new queries and "
             "the index: R_train's eigenbasis and the rotated encodings are built with the "
             "index, the queries enter by the Woodbury identity), unit norm. Build = first "
             "scoring run with an empty index (encodes "
             f"the corpus and the task's {problem.n_queries} queries); new = "
             f"{args.new_queries} new queries scored against the stored index.", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python -m "
             f"studies.trackstar_index {' '.join(sys.argv[1:])}`", "",
             "| projection | build s | new queries s | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['structure']} | {r['build']:.1f} | {r['new']:.1f} | "
              f"{r['new'] / r['build']:.3f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
