"""The LM-scale benchmark's tables (the runs: ``python -m studies.perf.lm_scale --quick``)."""

from __future__ import annotations

from types import SimpleNamespace

from studies.perf.lm_scale_report import sweep_lines, write_section


def row(estimator: str, data: str, peak: float, **extra) -> dict:
    return {"model": "gpt2", "estimator": estimator, "data": data, "exit": 0,
            "peak_rss_mb": peak, "load": 1.0, "commit": "abcdef0123", "fit_seconds": 10.0,
            "score_seconds": 5.0, "memory_budget_mb": 4000.0, **extra}


ARGS = SimpleNamespace(docs=300, queries=100, tokens=64, query_tokens=32, threads=1,
                       sweep_budget=3000, sweep_chunk=8, commit="abcdef0")


def test_query_sweep_fits_a_line_and_documents_compare_to_the_fewest():
    rows = [row("ekfac r=32 cached", f"data-300x{q}", 1000 + 19 * q) for q in (25, 50, 100)]
    rows += [row("ekfac r=32", "data-75x100", 5000), row("ekfac r=32", "data-300x100", 5200)]
    text = "\n".join(sweep_lines(ARGS, rows))
    assert "19.00 MB per query" in text and "R² = 1.0000" in text
    assert "`memory_budget_mb=3000`" in text
    assert "| 75 | 5,000 | +0.0% |" in text and "| 300 | 5,200 | +4.0% |" in text


def test_section_lists_main_runs_with_their_commits(tmp_path):
    out = tmp_path / "perf.md"
    out.write_text("# Performance\n")
    rows = [row("grad_dot", "data-300x100", 6000, commit="f146988aaa"),
            row("ekfac r=32 cached", "data-300x100", 3000),
            {**row("kfac", "data-300x100", 100), "exit": 1}]
    write_section(ARGS, rows, out)
    text = out.read_text()
    assert "| gpt2 | grad_dot | 10 |" in text and "| f146988 |" in text
    assert "cached" not in text.split("<!-- lm-scale -->")[1].split("Score-stage")[0]
    assert "| gpt2 | kfac | failed (exit 1) |" in text
