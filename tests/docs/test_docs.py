"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_library_example_runs():
    text = README.read_text()
    section = text.split("## Use it as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (4, 200)


def test_quick_start_commands_are_present():
    text = README.read_text()
    assert "pip install -e . && tda-bench" in text
    assert 'pip install -e ".[test]" && pytest' in text
