"""How close K-FAC and EK-FAC come to the exact damped GGN inverse on the digits tasks.

For each task and seed: train the model at the task's default config, score with
``explicit`` (GGN, damping 1e-3, its default) and with ``kfac`` / ``ekfac`` at their default
(true Fisher, heuristic damping) and at the same damping as ``explicit``, and report the
Pearson correlation of each score matrix with explicit's (over all query × train pairs, and
the mean over queries), with grad_dot as the floor. Writes ``results/ekfac_vs_explicit.md``.

    OMP_NUM_THREADS=1 python -m studies.ekfac_vs_explicit --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from estimators.ekfac import EKFAC, KFAC
from estimators.explicit import Explicit, curvature_matrix
from estimators.grad_dot import GradDot
from studies import common

EXPLICIT_DAMPING = 1e-3


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].item()


def mean_query_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(pearson(x, y) for x, y in zip(a, b, strict=True)) / a.shape[0]


def trained_problem(task_name: str, seed: int):
    """The attributed model of ``task_name`` and ``seed`` (trained once, cached)."""
    return common.trained_problem([f"task={task_name}", f"seed={seed}", "logger=none",
                                   "progress=false"])[0]


def rows_for(task_name: str, seed: int) -> list[dict]:
    problem = trained_problem(task_name, seed)
    start = time.perf_counter()
    exact = Explicit(damping=EXPLICIT_DAMPING).score(problem)
    rows = [{"task": task_name, "seed": seed, "estimator": "explicit (ggn)", "damping": "1e-3",
             "pearson": 1.0, "query_pearson": 1.0, "seconds": time.perf_counter() - start}]
    candidates = [("grad_dot", "-", GradDot())]
    for name, cls in (("kfac", KFAC), ("ekfac", EKFAC)):
        candidates += [(name, "heuristic", cls(seed=seed)),
                       (name, "1e-3", cls(seed=seed, damping=EXPLICIT_DAMPING))]
    for name, damping, estimator in candidates:
        start = time.perf_counter()
        estimator.fit(problem)
        scores = estimator.score(problem)
        rows.append({"task": task_name, "seed": seed, "estimator": name, "damping": damping,
                     "pearson": pearson(scores, exact),
                     "query_pearson": mean_query_pearson(scores, exact),
                     "seconds": time.perf_counter() - start})
    return rows


def damping_sweep(task_name: str, dampings: list[float]) -> list[str]:
    """Table rows: correlation with ``explicit`` when both use the same damping (seed 0)."""
    problem = trained_problem(task_name, 0)
    grad_dot = GradDot().score(problem)
    lines = []
    for damping in dampings:
        exact = Explicit(damping=damping).score(problem)
        kfac = KFAC(damping=damping).score(problem)
        ekfac = EKFAC(damping=damping).score(problem)
        lines.append(f"| {task_name} | {damping:g} | {pearson(grad_dot, exact):.4f} | "
                     f"{pearson(kfac, exact):.4f} | {pearson(ekfac, exact):.4f} |")
    return lines


def error_decomposition(task_name: str, seed: int) -> str:
    """Splits EK-FAC's distance from ``explicit`` into its three approximations.

    All at damping 1e-3, as Pearson correlations of score matrices: (1) the exact GGN made
    block-diagonal per layer (what any layer-wise method can reach at best) against the full
    GGN; (2) EK-FAC's Kronecker eigenbasis with *exact* eigenvalues diag(Qᵀ G_l Q) taken from
    the block-diagonal GGN (no sampling) against (1); (3) EK-FAC as shipped (eigenvalues
    re-fitted from sampled true-Fisher gradients) against (1). A table row.
    """
    problem = trained_problem(task_name, seed)
    ekfac = EKFAC(seed=seed, damping=EXPLICIT_DAMPING, cache_dir=None)
    engine = ekfac.engine(problem)
    ggn = curvature_matrix(problem, engine, "ggn", 64)  # mean GGN + λ₂I, [P, P]
    queries = engine.flatten(engine.all_gradients(problem, "queries", 256)).double()
    train = engine.flatten(engine.all_gradients(problem, "train", 256)).double()
    eye = torch.eye(ggn.shape[0], dtype=torch.float64)

    def scores(curvature: torch.Tensor) -> torch.Tensor:
        return -(torch.linalg.solve(curvature + EXPLICIT_DAMPING * eye, queries.T).T @ train.T)

    ekfac.fit(problem)
    block, eigenbasis_exact = torch.zeros_like(ggn), torch.zeros_like(ggn)
    start = 0
    for layer in engine.layers:
        end = start + layer.shape[0] * layer.shape[1]
        block[start:end, start:end] = ggn[start:end, start:end]
        factors = ekfac.factors[layer.name]
        basis = torch.kron(factors["q_s"], factors["q_a"])  # acts on row-major vec([o, i])
        exact = torch.diagonal(basis.T @ ggn[start:end, start:end] @ basis)
        eigenbasis_exact[start:end, start:end] = (basis * exact) @ basis.T
        start = end
    full, blockdiag = scores(ggn), scores(block)
    shipped = ekfac.score(problem).double()
    return (f"| {task_name} | {seed} | {pearson(blockdiag, full):.4f} | "
            f"{pearson(scores(eigenbasis_exact), blockdiag):.4f} | "
            f"{pearson(shipped, blockdiag):.4f} | {pearson(shipped, full):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_logreg", "digits_mlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweep", nargs="*", type=float, default=[1e-4, 1e-3, 3e-3, 1e-2, 1e-1],
                        help="dampings of the matched-damping sweep on digits_logreg")
    parser.add_argument("--out", default="results/ekfac_vs_explicit.md")
    args = parser.parse_args()
    decomposition = [error_decomposition(task, seed) for task in args.tasks for seed in args.seeds]
    rows = [row for task in args.tasks for seed in args.seeds for row in rows_for(task, seed)]
    lines = [
        "# K-FAC / EK-FAC vs the exact damped GGN inverse (`explicit`, damping 1e-3)",
        "",
        "Pearson correlation of each estimator's score matrix with `explicit`'s, over all",
        "query × train pairs and as the mean of per-query correlations; default task configs",
        "(1,000 train, 100 queries), true Fisher. `heuristic` = per-layer 0.1 × mean eigenvalue.",
        f"Command: `OMP_NUM_THREADS=1 python -m studies.ekfac_vs_explicit --seeds "
        f"{' '.join(map(str, args.seeds))}` (digits_logreg is convex and trained to its optimum:"
        " there the seed changes only the Fisher's target sampling)",
        "",
        "| task | seed | estimator | damping | pearson | mean query pearson | fit+score s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['task']} | {r['seed']} | {r['estimator']} | {r['damping']} | "
              f"{r['pearson']:.4f} | {r['query_pearson']:.4f} | {r['seconds']:.2f} |"
              for r in rows]
    if args.sweep:
        lines += ["", "## Same damping on both sides (digits_logreg, seed 0)", "",
                  "| task | damping | grad_dot | kfac | ekfac |", "|---|---|---|---|---|",
                  *damping_sweep("digits_logreg", args.sweep)]
    lines += ["", "## Where the distance comes from (damping 1e-3)", "",
              "Pearson correlations of score matrices. *block-diagonal* = the exact GGN with its",
              "cross-layer blocks zeroed (the best any layer-wise method can do), against the full",
              "GGN; *exact eigenvalues* = EK-FAC's Kronecker eigenbasis Q_S ⊗ Q_A with the exact",
              "eigenvalues diag(Qᵀ G_l Q) of the block-diagonal GGN (no Fisher sampling), against",
              "the block-diagonal GGN; *EK-FAC* = as shipped (sampled true-Fisher eigenvalues).",
              "",
              "| task | seed | block-diagonal vs full | exact eigenvalues vs block-diagonal | "
              "EK-FAC vs block-diagonal | EK-FAC vs full |",
              "|---|---|---|---|---|---|", *decomposition]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
