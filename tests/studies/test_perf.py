"""The per-estimator cost script (``python -m studies.perf.estimator_cost``)."""

from __future__ import annotations

import re

import pytest

from studies import common
from studies.perf import estimator_cost as ec
from studies.perf.ground_truth_speed import write_section
from tests.helpers import TINY

OTHER = "<!-- other -->\nkeep me\n<!-- /other -->\n"


def test_estimator_cost_runs_bench_and_writes_its_section(tmp_path):
    """The real thing on a tiny digits_mlp: a warm-up run, one timed estimator subprocess,
    numbers read back from its metrics.json into the markdown section."""
    out = tmp_path / "perf.md"
    out.write_text("# Performance benchmarks\n\n" + OTHER)
    tiny = [o for o in TINY["digits_mlp"] if not o.startswith("task.pbrf")]
    ec.main(["--tasks", "digits_mlp", "--sizes", "80", "--estimators", "grad_dot",
             "--timeout", "120", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
             "--override", *tiny])
    text = out.read_text()
    assert OTHER in text  # other sections kept
    row = re.search(r"\| digits_mlp \| (\d+) \| grad_dot \| ([\d.]+) \| ([\d.]+) \| (\d+) \|",
                    text)
    assert row, text
    assert int(row.group(1)) == 80  # the size override wins over TINY's n_train
    assert float(row.group(3)) >= 0 and float(row.group(4)) > 100  # score s (2 decimals), RSS MB
    assert "load average" in text and "torch " in text
    # the estimator's own caches start cold and are removed; the warm model stays
    assert not list((tmp_path / "cache").rglob("cache-grad_dot"))
    assert list((tmp_path / "cache" / "digits_mlp-80" / "models").rglob("*.pt"))


def fake_record(fit: float, score: float) -> dict:
    return {"fit_seconds": fit, "score_seconds": score, "peak_rss_mb": 600.0}


def test_measure_reports_refusals_timeouts_and_ekfac_throughput(tmp_path, monkeypatch):
    """Without subprocesses: n/a rows, a timeout skipping the larger size, the EK-FAC line,
    and a rerun replacing only its own section."""
    calls = []

    def fake_run_bench(overrides, out_dir, cache_dir, timeout):
        calls.append(overrides)
        estimator = next(o.split("=")[1] for o in overrides if o.startswith("estimator="))
        n = int(next(o.split("=")[1] for o in overrides if o.startswith("task.world.")))
        if estimator == "random":
            return ec.Result("ok", 1.0, fake_record(0, 0), n_train=9 * n, n_queries=20)
        if estimator == "explicit":
            return ec.Result("na", 2.0, reason="explicit refuses 400,000 parameters | big")
        if estimator == "lissa":
            return ec.Result("timeout", timeout, reason=f"> {timeout:g} s")
        return ec.Result("ok", 3.0, fake_record(2.0 * n / 10, 0.5 * n / 10))

    monkeypatch.setattr(ec, "run_bench", fake_run_bench)
    rows = ec.measure(["facts"], {"facts": [20, 10]}, ["ekfac", "explicit", "lissa"],
                      ["task.world.n_entities=99"], tmp_path, 30.0, log=lambda s: None)
    assert [(r["size"], r["estimator"], r["result"].status) for r in rows] == [
        (10, "ekfac", "ok"), (10, "explicit", "na"), (10, "lissa", "timeout"),
        (20, "ekfac", "ok"), (20, "explicit", "na"), (20, "lissa", "skipped")]
    assert not any("task.world.n_entities=99" in o for c in calls for o in c)
    assert all("fact_metrics.with_tail_patch=false" in c for c in calls)
    section = ec.table(rows, "cmd", "now", (1.0, 2.0, 3.0), (1.5, 2.0, 3.0), 30.0)
    assert "| facts | 90 | ekfac | 2.00 | 0.50 | 600 | 3 |" in section
    assert "| facts | 180 | lissa | not run (> 30 s at n_train 90) | – | – | – |" in section
    assert "n/a (explicit refuses 400,000 parameters / big) | – | – | 2 |" in section
    assert "scoring **180 train examples/s** against 20 queries" in section  # 90 / 0.5 s
    assert "45 examples/s (2.0 s)" in section  # the factor fit: 90 / 2 s
    assert "from n_train 90 to 180 (×2.00): ekfac ×2.0." in section  # 2.5 s -> 5 s
    table_rows = [line for line in section.splitlines() if line.startswith("| facts")]
    assert [line.split(" | ")[1:3] for line in table_rows[:2]] == [["90", "ekfac"],
                                                                   ["180", "ekfac"]]
    out = tmp_path / "perf.md"
    out.write_text("# Performance\n\n" + OTHER)
    write_section(out, section, ec.SECTION)
    write_section(out, section.replace("0.50", "0.75"), ec.SECTION)
    text = out.read_text()
    assert text.count(f"<!-- {ec.SECTION} -->") == 1 and "0.75" in text and OTHER in text


def test_unknown_estimator_is_refused():
    with pytest.raises(SystemExit):
        ec.main(["--estimators", "no_such_estimator", "--tasks", "digits_mlp"])


def test_crash_reason_is_the_exception_line():
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
              "NotImplementedError: forward AD is not implemented\nPlease file an issue\n")
    assert common.exception(stderr) == "NotImplementedError: forward AD is not implemented"
    assert common.exception("just this\n") == "just this"
