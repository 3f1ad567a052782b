"""The tables of :mod:`studies.perf.lm_scale`: the ``lm-scale`` section of ``results/perf.md``
from the runs recorded in ``<workdir>/lm_scale.jsonl``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pearson(a_path: str, b_path: str) -> float:
    import torch

    a, b = torch.load(a_path).double().flatten(), torch.load(b_path).double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def sweep_lines(args, rows: list[dict]) -> list[str]:
    """The memory sweeps: score-stage peak RSS against Q (factors cached), and the fitted
    runs' peak RSS against the number of documents."""
    out = []
    by_q = sorted(((int(r["data"].split("x")[1]), r) for r in rows if r["exit"] == 0
                   and r["model"] == "gpt2" and r["estimator"] == "ekfac r=32 cached"),
                  key=lambda x: x[0])
    if len(by_q) > 1:
        q = [x for x, _ in by_q]
        peak = [r["peak_rss_mb"] for _, r in by_q]
        slope, intercept = np.polyfit(q, peak, 1)
        r2 = float(np.corrcoef(q, peak)[0, 1] ** 2) if np.ptp(peak) > 0 else 1.0
        budget = f"`memory_budget_mb={args.sweep_budget}`" if args.sweep_budget else \
            "the default memory budget"
        budget += f", `estimator.chunk_size={args.sweep_chunk}`"
        out += ["", "Score-stage memory against Q·r: `ekfac estimator.query_rank=32` on the "
                "GPT-2-shaped model, factors loaded from the cache (scoring only), "
                f"{args.docs} documents, {budget}:", "",
                "| queries Q | Q·r | peak RSS MB | score s | load | commit |",
                "|---|---|---|---|---|---|"]
        out += [f"| {x} | {x * 32:,} | {r['peak_rss_mb']:,.0f} | {r['score_seconds']:,.0f} | "
                f"{r['load']:.1f} | {(r.get('commit') or '?')[:7]} |" for x, r in by_q]
        out += ["", f"Least-squares line: {slope:,.2f} MB per query ({slope / 32 * 1024:,.0f} "
                f"kB per query factor pair of rank 1), intercept "
                f"{intercept:,.0f} MB, R² = {r2:.4f}."]
    by_n = sorted(((int(r["data"].split("-")[1].split("x")[0]), r) for r in rows
                   if r["exit"] == 0 and r["model"] == "gpt2" and r["estimator"] == "ekfac r=32"
                   and r["data"].endswith(f"x{args.queries}")), key=lambda x: x[0])
    if len(by_n) > 1:
        out += ["", "Memory against the number of documents (fit + score, "
                f"`ekfac estimator.query_rank=32`, {args.queries} queries, the main run's "
                "default memory budget for every n):", "",
                "| documents | peak RSS MB | vs the fewest | fit s | score s | load | commit |",
                "|---|---|---|---|---|---|---|"]
        base = by_n[0][1]["peak_rss_mb"]
        out += [f"| {n} | {r['peak_rss_mb']:,.0f} | {r['peak_rss_mb'] / base - 1:+.1%} | "
                f"{r['fit_seconds']:,.0f} | {r['score_seconds']:,.0f} | {r['load']:.1f} | "
                f"{(r.get('commit') or '?')[:7]} |" for n, r in by_n]
    return out


def _rate(tokens: float, seconds: float | None) -> str:
    return f"{tokens / seconds:,.0f}" if seconds else "–"


def write_section(args, rows: list[dict], out: Path) -> None:
    """Replaces the ``lm-scale`` section of ``out`` with the table of ``rows``."""
    from studies.perf.ground_truth_speed import write_section

    main = f"data-{args.docs}x{args.queries}"
    train_tokens = args.docs * args.tokens
    lines = [
        "## LM scale: GPT-2-small- and Llama-shaped models on 2 CPU cores "
        "(`studies/perf/lm_scale.py`)", "",
        f"{args.docs} documents × {args.tokens} tokens, {args.queries} queries × "
        f"{args.query_tokens} tokens, random-init models saved locally (120-token vocabulary), "
        f"`task=hf_lm` with defaults (no memory flag), {args.threads} threads; peak RSS of the "
        "whole process; tokens/s = training tokens / stage seconds. The load average at the "
        "start of each run and the commit it ran are in the last columns.", "",
        "| model | estimator | fit s | fit tokens/s | score s | score tokens/s | "
        "(fit+score) tokens/s | peak RSS MB | budget MB | load | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["data"] != main or r["estimator"].endswith("cached"):
            continue
        commit = (r.get("commit") or "?")[:7]
        if r["exit"] != 0:
            lines.append(f"| {r['model']} | {r['estimator']} | failed (exit {r['exit']}) "
                         f"| | | | | {r['peak_rss_mb']:,.0f} | | {r['load']:.1f} | {commit} |")
            continue
        fit, score = r.get("fit_seconds"), r.get("score_seconds")
        budget = f"{r['memory_budget_mb']:,.0f}" if r.get("memory_budget_mb") else "–"
        lines.append(
            f"| {r['model']} | {r['estimator']} | {fit:,.0f} | {_rate(train_tokens, fit)} | "
            f"{score:,.0f} | {_rate(train_tokens, score)} | "
            f"{_rate(train_tokens, fit + score)} | {r['peak_rss_mb']:,.0f} | {budget} | "
            f"{r['load']:.1f} | {commit} |")
    ours = next((r for r in rows if r["model"] == "llama" and r["estimator"] == "ekfac r=32"
                 and r["data"] == main and r["exit"] == 0), None)
    theirs = next((r for r in rows if r["estimator"].startswith("kronfluence")
                   and r["exit"] == 0), None)
    if ours and theirs:
        ratio = ((theirs["fit_seconds"] + theirs["score_seconds"])
                 / (ours["fit_seconds"] + ours["score_seconds"]))
        lines += ["", f"EK-FAC (query rank 32) on the Llama-shaped model, fit + score: "
                  f"tda-bench {ratio:.2f}× kronfluence 1.0.1's throughput "
                  f"(fit {theirs['fit_seconds'] / ours['fit_seconds']:.2f}×, score "
                  f"{theirs['score_seconds'] / ours['score_seconds']:.2f}×), same run; "
                  f"Pearson of the scores (tda-bench vs −kronfluence): "
                  f"{pearson(ours['scores'], theirs['scores']):.4f}."]
    full = next((r for r in rows if r["model"] == "gpt2" and r["estimator"] == "ekfac"
                 and r["data"] == main and r["exit"] == 0), None)
    low = next((r for r in rows if r["model"] == "gpt2" and r["estimator"] == "ekfac r=32"
                and r["data"] == main and r["exit"] == 0), None)
    if full and low:
        lines += ["", f"EK-FAC with `query_rank=32` against exact queries on the GPT-2-shaped "
                  f"model: Pearson {pearson(full['scores'], low['scores']):.4f} over all "
                  f"{args.queries} × {args.docs} scores."]
    lines += sweep_lines(args, rows)
    write_section(out, "<!-- lm-scale -->\n" + "\n".join(lines) + "\n<!-- /lm-scale -->\n",
                  "lm-scale")
