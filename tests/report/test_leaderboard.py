"""The leaderboard builder on synthetic run records: aggregation, seeded bootstrap intervals,
missing-seed marking, floor and ceiling rows, byte-identical rebuilds; the plots' fits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bench.metrics import lds_ceiling
from bench.report import leaderboard as lb
from bench.report import records as run_records
from bench.report import stats, tables
from bench.report.plots import layer_share, power_law_fit
from tests.helpers import write_run


@pytest.fixture
def records(tmp_path):
    """Task ``t``: ``good`` (3 seeds), ``bad`` (seeds 0, 1), ``random`` (3 seeds)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    values = {}
    for estimator, centre, seeds, seconds in (("good", 0.8, (0, 1, 2), 10.0),
                                              ("bad", 0.3, (0, 1), 1.0),
                                              ("random", 0.0, (0, 1, 2), 0.01)):
        for seed in seeds:
            lds = centre + 0.1 * rng.standard_normal(20)
            lds[3] = np.nan  # an undefined query is left out, not counted as 0
            values[estimator, seed] = lds
            write_run(root, "t", estimator, seed, lds, seconds=seconds * (1 + seed),
                      extra={"lds_ceiling": 0.9})
    return root, values


def test_means_intervals_and_marks(records, tmp_path):
    root, values = records
    cells = lb.build([root], tmp_path / "out", n_boot=500, plots=False, argv=["runs"])
    lds = cells[cells["metric"] == "lds"].set_index("estimator")
    for name in ("good", "bad", "random"):
        per_seed = [np.nanmean(v) for (e, _), v in values.items() if e == name]
        assert lds.loc[name, "mean"] == pytest.approx(np.mean(per_seed))
        assert lds.loc[name, "lo"] < lds.loc[name, "mean"] < lds.loc[name, "hi"]
    assert lds.loc["bad", "missing_seeds"] == "2" and lds.loc["bad", "n_seeds"] == 2
    assert lds.loc["good", "missing_seeds"] == "" and bool(lds.loc["good", "best"])
    assert lds.loc[tables.CEILING, "mean"] == pytest.approx(0.9)
    seconds = cells[cells["metric"] == "seconds"].set_index("estimator")
    assert seconds.loc["good", "mean"] == pytest.approx(20.0)  # 10, 20, 30
    assert bool(seconds.loc["bad", "best"])  # the random floor is a reference, never best
    assert not bool(seconds.loc["random", "best"]) and not bool(seconds.loc["good", "best"])

    md = (tmp_path / "out" / "LEADERBOARD.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    names = [r.split(" | ")[0][2:] for r in rows if "[" in r]
    assert names == ["bad †", "good", "random"]  # random is the floor, last
    assert "| bad † |" in md and "2/3 (missing 2)" in md and "| good | **0.8" in md
    assert f"| *{tables.CEILING}* | 0.900 |" in md
    assert "`tda-bench -m task=t estimator=good seed=0,1,2`" in md
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv", dtype={"t/missing_seeds": str})
    assert list(csv["estimator"]) == ["bad", "good", "random", tables.CEILING]
    assert csv.loc[0, "t/missing_seeds"] == "2" and csv.loc[0, "t/n_seeds"] == 2


def test_expected_seeds_option(records, tmp_path):
    root, _ = records
    cells = lb.build([root], tmp_path / "out", seeds=[0, 1, 2, 3], n_boot=100, plots=False)
    lds = cells[cells["metric"] == "lds"].set_index("estimator")
    assert lds.loc["good", "missing_seeds"] == "3" and lds.loc["bad", "missing_seeds"] == "2,3"


def test_bootstrap_is_seeded_and_calibrated():
    values = np.random.default_rng(1).standard_normal((1, 400))
    first = stats.bootstrap_interval(values, stats.cell_seed(0, "a"), 4000)
    assert first == stats.bootstrap_interval(values, stats.cell_seed(0, "a"), 4000)
    assert first != stats.bootstrap_interval(values, stats.cell_seed(1, "a"), 4000)
    # the percentile interval of a mean of 400 standard normals: ±1.96·σ̂/√400
    half = (first[1] - first[0]) / 2
    assert half == pytest.approx(1.96 * values.std() / 20, rel=0.1)
    # seeds are resampled too: between-seed spread widens the interval
    shifted = values.repeat(3, 0) + np.array([[-1.0], [0.0], [1.0]])
    lo, hi = stats.bootstrap_interval(shifted, stats.cell_seed(0, "a"), 4000)
    assert hi - lo > 5 * (first[1] - first[0])
    assert np.isnan(stats.bootstrap_interval(np.array([[0.5]]), stats.cell_seed(0, "a"))[0])


def test_rebuild_is_byte_identical_with_plots(tmp_path):
    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "runs"
    for estimator in ("grad_dot", "random"):
        for seed in (0, 1):
            scores = torch.randn(4, 50, generator=gen) ** 3
            write_run(root, "t", estimator, seed, np.linspace(0, 1, 4) + seed, scores=scores)
    write_run(root, "t", "grad_dot[damping=0.1]", 0, [0.1, 0.2, 0.3, 0.4],
              command="tda-bench task=t estimator=grad_dot estimator.damping=0.1 seed=0")
    outputs = []
    for _ in range(2):  # the same command twice, into the same folder
        lb.main([str(root), "--out", str(tmp_path / "out"), "--bootstrap", "200"])
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / "out").iterdir())})
    assert outputs[0] == outputs[1]
    assert {"LEADERBOARD.md", "leaderboard.csv", "accuracy_vs_cost_t.png", "power_law.csv",
            "score_ccdf_t_grad_dot.png"} <= set(outputs[0])
    md = outputs[0]["LEADERBOARD.md"].decode()
    assert "| grad_dot[damping=0.1] † |" in md  # a variant is its own row, with 1 of 2 seeds


def test_duplicate_records_keep_the_first(tmp_path, capsys):
    write_run(tmp_path / "a", "t", "e", 0, [0.1, 0.2])
    write_run(tmp_path / "b", "t", "e", 0, [0.9, 0.8])
    frame = run_records.label_runs(run_records.collect([tmp_path]))
    assert len(frame) == 1 and frame["run"][0].record["lds"] == pytest.approx(0.15)
    assert "ignoring" in capsys.readouterr().err


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lb.main([str(tmp_path / "nowhere")])
    assert "is not a directory" in capsys.readouterr().err


def test_power_law_fit_recovers_exponent():
    u = np.random.default_rng(0).random(5000)
    x = 0.01 * (1 - u) ** (-1 / (2.5 - 1))  # Pareto with α = 2.5, x_min = 0.01
    alpha, xmin, n_tail = power_law_fit(x)
    assert alpha == pytest.approx(2.5, abs=0.15) and n_tail >= 10 and xmin >= 0.01


def test_layer_share_sums_to_one():
    layer_scores = torch.tensor([[[1.0, -1.0], [0.0, 3.0]], [[2.0, 0.0], [1.0, 0.0]]])  # [2,2,2]
    share = layer_share(layer_scores, ["a", "b"])
    assert share.loc["a"].tolist() == pytest.approx([0.5, 0.5])
    assert share.loc["b"].tolist() == pytest.approx([0.75, 0.25])


def test_lds_ceiling():
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(30, 1, 5, generator=gen)
    assert lds_ceiling(signal.repeat(1, 2, 1)) == pytest.approx(1.0)
    assert lds_ceiling(signal) is None
    noisy = signal + 3 * torch.randn(30, 4, 5, generator=gen)
    assert -0.5 < lds_ceiling(noisy) < 0.9


def test_fact_tracing_records_use_their_query_sets(tmp_path):
    """Fact tracing records ``mrr`` (column ``rr``) over forward queries, ``flipped_mrr``
    over flipped ones (a ``query_set`` column); intervals come from the right rows."""
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        out.mkdir()
        per_query = pd.DataFrame({"query": range(6), "query_set": ["forward"] * 3 + ["flipped"] * 3,
                                  "rr": [1.0, 0.5, 1.0, 0.0, 0.25, 0.0],
                                  "recall@10": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]})
        per_query.to_csv(out / "per_query.csv", index=False)
        record = {"task": "facts", "estimator": "bm25", "seed": seed, "mrr": 2.5 / 3,
                  "recall@10": 2 / 3, "flipped_mrr": 0.25 / 3, "flipped_recall@10": 0.0,
                  "query_accuracy": 0.9, "fit_seconds": 1.0, "score_seconds": 1.0}
        (out / "metrics.json").write_text(json.dumps(record))
    cells = lb.build([tmp_path], tmp_path / "out", n_boot=300, plots=False)
    by = cells.set_index("metric")
    assert list(cells["metric"]) == ["mrr", "recall@10", "flipped_mrr", "flipped_recall@10",
                                     "seconds"]
    assert by.loc["mrr", "mean"] == pytest.approx(2.5 / 3)
    assert 0.5 <= by.loc["mrr", "lo"] < by.loc["mrr", "hi"] <= 1.0  # forward rows only
    assert 0.0 <= by.loc["flipped_mrr", "lo"] < by.loc["flipped_mrr", "hi"] <= 0.25
    assert by.loc["flipped_recall@10", "lo"] == by.loc["flipped_recall@10", "hi"] == 0.0


def test_paired_differences_see_through_shared_query_noise(tmp_path):
    """Two rows share a large per-query effect (the same queries are hard for both) and differ
    by a small constant: the paired interval separates them although their own intervals
    overlap, and its centre is the mean difference."""
    rng = np.random.default_rng(1)
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        shared = rng.standard_normal(40)
        write_run(root, "t", "a", seed, shared + 0.05 + 0.01 * rng.standard_normal(40))
        write_run(root, "t", "b", seed, shared + 0.01 * rng.standard_normal(40))
    cells = lb.build([root], tmp_path / "out", n_boot=1000, plots=False,
                     compare=[("a", "b"), ("b", "a")])
    lds = cells[cells["metric"] == "lds"].set_index("estimator")
    assert lds.loc["a", "lo"] < lds.loc["b", "hi"]  # unpaired: overlapping
    md = (tmp_path / "out" / "LEADERBOARD.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| t | `")]
    assert len(lines) == 2 and "A > B" in lines[0] and "A < B" in lines[1]
    diff = float(lines[0].split(" | ")[6].split(" ")[0])
    assert diff == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="no row named 'c'"):
        lb.build([root], tmp_path / "out2", n_boot=10, plots=False, compare=[("a", "c")])


def test_row_labels_spell_constants_one_way(tmp_path):
    """A sweep records ``True``, a user types ``true``: one row; ``none`` is a string."""
    root = tmp_path / "runs"
    for seed, (flag, dim) in enumerate((("True", "NULL"), ("true", "null"))):
        write_run(root, "t", "e", seed, [0.5, 0.6],
                  command=f"tda-bench task=t estimator=e estimator.unit_norm={flag} "
                          f"estimator.projection_dim={dim} estimator.hessian=none seed={seed}")
    frame = run_records.label_runs(run_records.collect([root]))
    assert set(frame["estimator"]) == {"e[hessian=none,projection_dim=null,unit_norm=true]"}


def test_archive_copies_records_and_rebuilds_identically(records, tmp_path, monkeypatch):
    root, _ = records
    (root / "t_bad_seed0" / "scores.pt").write_bytes(b"large")
    monkeypatch.chdir(tmp_path)
    lb.main(["runs", "--out", "a", "--no-plots", "--bootstrap", "50"])
    lb.main(["runs", "--out", "b", "--no-plots", "--bootstrap", "50", "--archive", "kept"])
    assert not list((tmp_path / "kept").rglob("scores.pt"))
    assert len(list((tmp_path / "kept" / "runs").rglob("metrics.json"))) == 8
    built = (tmp_path / "b" / "LEADERBOARD.md").read_text()
    assert "tda-bench-leaderboard kept --out b --no-plots --bootstrap 50`" in built
    lb.main(["kept", "--out", "c", "--no-plots", "--bootstrap", "50"])
    assert (tmp_path / "c" / "leaderboard.csv").read_bytes() == (
        tmp_path / "a" / "leaderboard.csv").read_bytes()
    assert (tmp_path / "c" / "LEADERBOARD.md").read_text().replace("--out c", "--out b") == built


def test_estimator_independent_baselines_are_rows_and_diagnostics_a_table_of_their_own(
        tmp_path):
    """``tail_patch_random`` is the same in every estimator's record: one row of its own (its
    ``tail_patch`` cell), never a column, never bold; metrics that are not headline go to
    the diagnostics table."""
    root = tmp_path / "runs"
    for estimator, value in (("a", 0.5), ("b", 0.2)):
        for seed in (0, 1):
            out = write_run(root, "t", estimator, seed, [value, value + 0.1],
                            extra={"tail_patch": value, "tail_patch_random": 0.9,
                                   "proponent_share": 0.1})
            per_query = pd.read_csv(out / "per_query.csv").assign(proponent_share=[0.1, 0.1])
            per_query.to_csv(out / "per_query.csv", index=False)
    cells = lb.build([root], tmp_path / "out", n_boot=50, plots=False)
    row = cells[cells["estimator"] == "random ranking"]
    assert list(row["metric"]) == ["tail_patch"] and float(row["mean"].iloc[0]) == 0.9
    assert "tail_patch_random" not in set(cells["metric"])
    best = cells[(cells["metric"] == "tail_patch") & cells["best"]]
    assert list(best["estimator"]) == ["a"]  # the baseline's 0.9 is a reference, not a winner
    text = (tmp_path / "out" / "LEADERBOARD.md").read_text()
    headline, diagnostics = text.split("## t", 1)[1].split("Diagnostics:", 1)
    assert "| *random ranking* |" in headline and "tail_patch ↑" in headline
    assert "proponent_share ↑" in diagnostics and "proponent_share" not in headline


def test_noise_ceilings_are_a_row_not_a_column():
    """``lds_ceiling`` has per-query values (so query groups get their own), but it and its
    ``flipped_`` variant are ``info`` metrics: no accuracy column."""
    from pathlib import Path

    import pandas as pd

    from bench.report.records import Run, metric_names

    per_query = pd.DataFrame({"query": [0, 1, 2, 3], "query_set": ["forward"] * 2 + ["flipped"] * 2,
                              "lds": [0.1, 0.2, 0.3, 0.4], "lds_ceiling": [0.5, 0.6, 0.7, 0.8]})
    record = {"task": "t", "estimator": "e", "seed": 0, "lds": 0.15, "flipped_lds": 0.35,
              "lds_ceiling": 0.55, "flipped_lds_ceiling": 0.75}
    names = metric_names([Run(Path("."), record, per_query)])
    assert "lds" in names and "flipped_lds" in names
    assert "lds_ceiling" not in names and "flipped_lds_ceiling" not in names
