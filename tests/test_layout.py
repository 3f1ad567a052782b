"""The architecture as tests: one-way data flow, no import cycle, small files, no side channel.

Data flows task → problem → estimator → bench: estimators import neither tasks nor bench;
tasks import only the problem contract of estimators; the library (bench, estimators, tasks)
never imports studies. Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "estimators", "tasks", "studies", "tda_bench", "hydra_plugins")
LIBRARY = ("bench", "estimators", "tasks", "tda_bench")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every project module by dotted name."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that ``path`` (module ``name``) imports, anywhere in the file."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(path, name, set(modules())) for name, path in modules().items()}


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            # a package's __init__ importing its own submodules (plug-in discovery) is not a cycle
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("layer,forbidden", [
    ("estimators", ("tasks", "bench", "studies", "tda_bench")),
    ("tasks", ("bench", "studies", "tda_bench")),
    ("bench", ("studies", "tda_bench")),
    ("tda_bench", ("studies",)),
])
def test_data_flows_one_way(layer, forbidden):
    bad = sorted((m, i) for m, targets in GRAPH.items() if m.split(".")[0] == layer
                 for i in targets if i.split(".")[0] in forbidden)
    assert not bad, f"{layer} must not import {forbidden}: {bad}"


TASK_CONTRACT = ("estimators.problem", "estimators.options")  # the contract and its validators


def test_tasks_use_only_the_problem_contract_of_estimators():
    bad = sorted((m, i) for m, targets in GRAPH.items() if m.startswith("tasks")
                 for i in targets if i.startswith("estimators") and i not in TASK_CONTRACT)
    assert not bad, f"tasks may import only {TASK_CONTRACT}: {bad}"


def test_files_stay_small():
    sources = [p for package in (*PACKAGES, "tests") for p in (REPO / package).rglob("*.py")]
    big = {str(p.relative_to(REPO)): n for p in sources
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}"



def test_no_untyped_side_channel_on_the_problem():
    sources = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    users = [str(p.relative_to(REPO)) for p in sources
             if "problem.extra" in p.read_text() or ".extra[" in p.read_text()]
    assert not users, f"problem.extra is gone; use the problem's typed capabilities: {users}"


def test_one_eval_mode_helper():
    """Estimators and tasks switch a model to eval mode only through
    ``estimators.problem.eval_mode``, which restores the mode it found; no module reads
    ``.training`` to save and restore it by hand."""
    bad = []
    for package in ("estimators", "tasks", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "estimators" / "problem.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "training":
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, f"use estimators.problem.eval_mode instead of saving .training: {bad}"
