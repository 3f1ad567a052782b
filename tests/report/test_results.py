"""The committed leaderboards (``results/**/LEADERBOARD.md``) are rebuilt from the committed
run records (``results/records/``) byte for byte, with the command each table names."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from bench.report import leaderboard as lb

REPO = Path(__file__).resolve().parents[2]
TABLES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "results").rglob("LEADERBOARD.md"))


@pytest.mark.parametrize("table", TABLES)
def test_committed_table_rebuilds_from_committed_records(table, tmp_path, monkeypatch):
    text = (REPO / table).read_text()
    found = re.search(r"Built with `tda-bench-leaderboard (.*?)` from", text)
    assert found, f"{table} does not say how it was built"
    argv = shlex.split(found.group(1))
    out = argv[argv.index("--out") + 1]
    assert (REPO / out / "LEADERBOARD.md") == REPO / table
    sources = [a for a in argv if not a.startswith("-") and (REPO / a).is_dir() and a != out]
    assert sources and all(a.startswith("results/records/") for a in sources), (
        f"{table} must be built from committed records under results/records/, not {sources}")
    monkeypatch.chdir(REPO)
    rebuilt_argv = [str(tmp_path) if i == argv.index("--out") + 1 else a
                    for i, a in enumerate(argv)]
    lb.main(rebuilt_argv)
    rebuilt = (tmp_path / "LEADERBOARD.md").read_text().replace(f"--out {tmp_path}", f"--out {out}")
    assert rebuilt == text
    committed = (REPO / out / "leaderboard.csv").read_bytes()
    assert (tmp_path / "leaderboard.csv").read_bytes() == committed


@pytest.mark.parametrize("name, module", [("FINDINGS.md", "studies.findings"),
                                          ("trackstar_projection.md",
                                           "studies.trackstar_projection"),
                                          ("leaderboard_profile.md", "studies.sweep_profile")])
def test_committed_study_rebuilds_from_committed_records(name, module, tmp_path, monkeypatch):
    """A generated study (``results/FINDINGS.md``, ``trackstar_projection.md``,
    ``leaderboard_profile.md``) rebuilds byte for byte with the command its header names."""
    path = REPO / "results" / name
    if not path.exists():
        pytest.skip(f"results/{name} is not committed")
    text = path.read_text()
    found = re.search(rf"Built with `python -m {re.escape(module)} (.*?)`", text)
    assert found, f"results/{name} does not say how it was built"
    argv = shlex.split(found.group(1))
    out = argv[argv.index("--out") + 1]
    assert out == f"results/{name}"
    monkeypatch.chdir(REPO)
    argv[argv.index("--out") + 1] = str(tmp_path / name)
    importlib.import_module(module).main(argv)
    assert (tmp_path / name).read_text().replace(str(tmp_path / name), out) == text
