"""A plain (non-editable) install ships the whole Hydra config tree and finds it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_plain_install_finds_its_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("tda_bench-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert expected <= shipped, expected - shipped

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("from bench.cli import CONF_DIR; from pathlib import Path; "
             "print(CONF_DIR); assert (Path(CONF_DIR) / 'config.yaml').exists(); "
             "import tda_bench; assert tda_bench.__file__.startswith(str(Path(CONF_DIR).parent)); "
             "assert type(tda_bench.estimator('grad_dot')).__name__ == 'GradDot'")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(target))
