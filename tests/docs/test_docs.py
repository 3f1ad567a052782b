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


def test_library_examples_run():
    blocks = python_blocks(LIBRARY)
    assert blocks, "docs/library.md has no python example"
    shapes = []
    for i, code in enumerate(blocks):
        assert "assert scores.shape ==" in code, f"example {i} must assert its score shape"
        namespace: dict = {}
        exec(compile(code, f"docs/library.md[{i}]", "exec"), namespace)
        shapes.append(tuple(namespace["scores"].shape))
    assert shapes[0] == (4, 200)


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
