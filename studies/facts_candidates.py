"""Benchmark: candidate filtering (Grosse et al. 2023's TF-IDF filter) for ``grad_dot`` on
``facts``: how many of the unfiltered top-10 documents survive the filter, and the time saved.

    python -m studies.facts_candidates [--k 100] [--retriever tfidf] [--n-queries N]
        [--out results/...json] [task overrides, e.g. train.epochs=20]

The gradient pass covers the union of all queries' candidates, so the time saved shrinks as
queries grow (``--n-queries`` keeps the first N forward and N flipped queries).

Uses (or trains and caches) the same model as ``tda-bench task=facts`` with the same task
overrides and ``$TDA_BENCH_CACHE``. Times are wall-clock seconds of ``score`` with the
current torch thread count (set ``OMP_NUM_THREADS=1`` for steadier numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from bench.metrics.fact_tracing import fact_tracing, ranking
from estimators.grad_dot import GradDot
from estimators.problem import AttributionProblem
from studies.common import trained_problem


def first_queries(problem: AttributionProblem, n: int) -> AttributionProblem:
    """The problem with only the first ``n`` queries of each query group."""
    groups = problem.query_groups
    keep = [q for idx in groups.values() for q in idx[:n]]
    new_groups, start = {}, 0
    for name, idx in groups.items():
        new_groups[name] = list(range(start, start + len(idx[:n])))
        start += len(idx[:n])
    return dataclasses.replace(problem, queries=Subset(problem.queries, keep),
                               query_groups=new_groups,
                               proponents=[problem.proponents[q] for q in keep],
                               query_text=[problem.query_text[q] for q in keep])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=100, help="candidates per query")
    parser.add_argument("--retriever", default="tfidf", choices=["tfidf", "bm25"])
    parser.add_argument("--top", type=int, default=10, help="the unfiltered top-n checked")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--n-queries", type=int, default=None,
                        help="keep only the first n forward and n flipped queries")
    parser.add_argument("--out", default="results/facts_candidates.json")
    parser.add_argument("overrides", nargs="*", help="task overrides (key=value)")
    args = parser.parse_args()

    overrides = [o if o.startswith(("task.", "+task.")) else f"task.{o}" for o in args.overrides]
    problem = trained_problem(["task=facts", "progress=false", "logger=none", *overrides])[0]
    if args.n_queries:
        problem = first_queries(problem, args.n_queries)

    start = time.perf_counter()
    full = GradDot(chunk_size=args.chunk_size).score(problem)
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    filtered_estimator = GradDot(chunk_size=args.chunk_size,
                                 candidates={"retriever": args.retriever, "k": args.k})
    filtered = filtered_estimator.score(problem)
    filtered_s = time.perf_counter() - start

    top_full = ranking(full)[:, :args.top]
    top_filtered = ranking(filtered)[:, :args.top]
    scored = ~torch.isnan(filtered)
    survive = scored.gather(1, top_full).sum(1).double()  # unfiltered top-n among candidates
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist()))
                            for a, b in zip(top_full, top_filtered, strict=True)]).double()
    sets = problem.query_groups
    m_full, _ = fact_tracing(problem, full)
    m_filtered, _ = fact_tracing(problem, filtered)
    report = {
        "task_overrides": args.overrides, "retriever": args.retriever, "k": args.k,
        "n_queries_per_set": args.n_queries,
        "top": args.top, "n_train": problem.n_train, "n_queries": problem.n_queries,
        "union_of_candidates": int(scored.any(0).sum()),
        "score_seconds_unfiltered": full_s, "score_seconds_filtered": filtered_s,
        "time_saved_fraction": 1 - filtered_s / full_s,
        "torch_threads": torch.get_num_threads(),
        **{f"{name}_top{args.top}_surviving_mean": float(survive[idx].mean())
           for name, idx in sets.items()},
        **{f"{name}_top{args.top}_overlap_mean": float(overlap[idx].mean())
           for name, idx in sets.items()},
        "unfiltered": {k: m_full[k] for k in sorted(m_full)},
        "filtered": {k: m_filtered[k] for k in sorted(m_filtered)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
