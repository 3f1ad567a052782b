"""The documentation stays true: a short README with the quick start, runnable library
examples, relative links that resolve, and every ``conf/config.yaml`` key documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
LIBRARY = REPO / "docs" / "library.md"
CONFIGURATION = REPO / "docs" / "configuration.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "results" / "README.md"]
MAX_README_LINES = 250
# Blocks of conf/config.yaml whose keys are documented one by one.
BLOCKS = ("ground_truth", "fact_metrics", "removal")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def relative_links(path: Path) -> list[str]:
    """The link targets of a markdown file outside code, less web links, mail links and
    pure anchors, with any ``#anchor`` dropped."""
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference to docs/"


def test_quick_start_commands_are_present():
    text = README.read_text()
    assert "pip install torch==" in text
    assert "pip install -e . && tda-bench" in text
    assert 'pip install -e ".[test]" && pytest' in text
    assert text.index("pip install torch==") < text.index("pip install -e . && tda-bench")


def notebook_sections(path: Path) -> dict[str, list[tuple[str, str | None]]]:
    """Each ``## `` section of a page with python code: its python cells in order, each
    with the text block that directly follows it (its printed output), or None."""
    out = {}
    for section in re.split(r"^## ", path.read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0]
        fences = list(re.finditer(r"^```(\w*)\n(.*?)^```\n?", section, re.S | re.M))
        cells = []
        for i, fence in enumerate(fences):
            if fence.group(1) != "python":
                continue
            nxt = fences[i + 1] if i + 1 < len(fences) else None
            follows = (nxt is not None and nxt.group(1) == "text"
                       and not section[fence.end():nxt.start()].strip())
            cells.append((fence.group(2), nxt.group(2) if follows else None))
        if cells:
            out[title] = cells
    return out


NUMBER = re.compile(r"-?\d+\.\d+")


def same_output(printed: str, shown: str) -> bool:
    """Whether ``printed`` is the output ``shown`` on the page: the same text, and every
    decimal number within one unit of its last shown digit (BLAS rounding differs between
    machines)."""
    if NUMBER.sub("#", printed.strip()) != NUMBER.sub("#", shown.strip()):
        return False
    return all(abs(float(a) - float(b)) <= 1.01 * 10.0 ** -len(b.split(".")[1])
               for a, b in zip(NUMBER.findall(printed), NUMBER.findall(shown), strict=True))


def test_library_examples_run():
    """docs/library.md as one notebook: its cells run top to bottom in one namespace, every
    shown output is what the cell before it prints, each section asserts its score shape,
    and only the public API (``tda_bench``, a task) is imported."""
    import contextlib
    import io

    import torch

    sections = notebook_sections(LIBRARY)
    assert "Your model, end to end" in sections, "docs/library.md lost its main example"
    text = LIBRARY.read_text()
    assert not re.search(r"^\s*(from|import) (estimators|bench)\b", text, re.M), \
        "docs/library.md must use the public API (tda_bench), not estimators/bench"
    namespace: dict = {}
    previous = torch.get_default_dtype()
    try:
        for title, cells in sections.items():
            assert any("assert scores.shape ==" in code for code, _ in cells), \
                f"docs/library.md section {title!r} must assert its score shape"
            for i, (code, expected) in enumerate(cells):
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    exec(compile(code, f"docs/library.md[{title}][{i}]", "exec"), namespace)
                if expected is not None:
                    assert same_output(printed.getvalue(), expected), \
                        (title, i, printed.getvalue())
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    assert page.exists(), f"{page.relative_to(REPO)} is missing"
    broken = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_every_docs_page_is_linked_from_the_readme_and_the_index():
    readme = {(REPO / t).resolve() for t in relative_links(README)}
    index = {(REPO / "docs" / t).resolve() for t in relative_links(REPO / "docs" / "README.md")}
    for page in sorted((REPO / "docs").glob("*.md")):
        assert page.resolve() in readme, f"README.md does not link {page.name}"
        if page.name != "README.md":
            assert page.resolve() in index, f"docs/README.md does not link {page.name}"


def config_keys() -> list[str]:
    config = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    keys = [k for k in config if k != "defaults"]
    keys += [next(iter(d)) for d in config["defaults"] if isinstance(d, dict)]
    keys += [f"{block}.{k}" for block in BLOCKS for k in config[block]]
    return keys


def test_config_keys_are_documented():
    text = CONFIGURATION.read_text()
    missing = [k for k in config_keys() if not re.search(rf"`{re.escape(k)}[`.:]", text)]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_the_extending_example_registers_a_metric_and_a_ground_truth_through_the_seams(
        tmp_path):
    """docs/extending.md's toy plug-in, saved as written, appears in a run's metrics.json and
    per_query.csv and as a headline column of the leaderboard, with no other file edited."""
    import json
    import os
    import subprocess
    import sys

    text = (REPO / "docs" / "extending.md").read_text()
    section = text.split("## A metric and a ground-truth kind", 1)[1]
    (tmp_path / "toy_plugin.py").write_text(python_blocks_of(section)[0])
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "WANDB_MODE": "offline"}
    tiny = ["task.n_train=120", "task.n_queries=12", "task.epochs=3", "task.lds.subsets=8",
            "task.lds.seeds=1", "task.pbrf=null"]
    run = subprocess.run(
        [sys.executable, "-m", "bench", "task=digits_mlp", "estimator=grad_dot",
         "plugins=[toy_plugin]", "+task.same_label.k=5", "logger=none", "progress=false",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'runs' / 'toy'}", *tiny],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "toy" / "metrics.json").read_text())
    assert 0.0 <= record["same_label@5"] <= 1.0 and record["plugins"] == ["toy_plugin"]
    assert "same_label@5" in (tmp_path / "runs" / "toy" / "per_query.csv").read_text()
    assert "same_label@5" in run.stdout  # the printed table reads the spec too
    board = subprocess.run(
        [sys.executable, "-m", "bench.report.leaderboard", "runs", "--out", "board",
         "--no-plots", "--bootstrap", "20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert board.returncode == 0, board.stderr[-3000:]
    table = (tmp_path / "board" / "LEADERBOARD.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| estimator"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    # a headline metric: among the leading columns, in its spec's order, higher is better
    assert columns[:3] == ["estimator", "lds ↑", "same_label@5 ↑"], columns


def python_blocks_of(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_the_extending_estimator_example_runs_from_outside_the_repository(tmp_path,
                                                                         monkeypatch):
    """docs/extending.md's DiagFisher, its module on PYTHONPATH and its YAML on Hydra's search
    path: a run and a score matrix, no file of the repository edited."""
    import json
    import os
    import subprocess
    import sys

    text = (REPO / "docs" / "extending.md").read_text().split("## A task", 1)[0]
    (tmp_path / "diag_fisher.py").write_text(python_blocks_of(text)[0])
    yaml_block = re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)[0]
    (tmp_path / "conf" / "estimator").mkdir(parents=True)
    (tmp_path / "conf" / "estimator" / "diag_fisher.yaml").write_text(
        yaml_block.replace("estimators.diag_fisher.DiagFisher", "diag_fisher.DiagFisher"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "WANDB_MODE": "offline"}
    run = subprocess.run(
        [sys.executable, "-m", "bench", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
         "task=digits_mlp", "estimator=diag_fisher", "logger=none", "progress=false",
         "task.n_train=120", "task.n_queries=12", "task.epochs=3", "task.lds.subsets=8",
         "task.lds.seeds=1", "task.pbrf=null", f"cache_dir={tmp_path / 'cache'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["estimator"] == "diag_fisher" and -1.0 <= record["lds"] <= 1.0
    import tda_bench  # ... and from Python, by its name on the search path

    monkeypatch.syspath_prepend(str(tmp_path))
    estimator = tda_bench.estimator("diag_fisher", searchpath=[str(tmp_path / "conf")])
    assert type(estimator).__name__ == "DiagFisher"
