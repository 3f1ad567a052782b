"""The peers study's table (the script: ``python -m studies.peers --quick``), on fake records."""

from __future__ import annotations

import numpy as np
import torch

from studies.peers import PAIRS, Study, pair_table
from tests.helpers import write_run


def test_pair_table_reports_pearson_paired_differences_costs_and_skips(tmp_path):
    root = tmp_path / "defaults"
    gen = torch.Generator().manual_seed(0)
    for seed in (0, 1):
        scores = torch.randn(5, 20, generator=gen)
        lds = np.linspace(0.2, 0.6, 5) + seed / 10
        write_run(root, "digits_mlp", "ekfac", seed, lds, seconds=1.0, scores=scores)
        write_run(root, "digits_mlp", "kronfluence_ekfac", seed, lds - 0.1, seconds=4.0,
                  scores=2 * scores + 1)
    study = Study(tmp_path, None, quick=False)
    rows = pair_table(study, "digits_mlp", [0, 1], "defaults")
    assert len(rows) == len(PAIRS)
    ekfac = rows[0].split(" | ")
    assert ekfac[:3] == ["| ekfac", "kronfluence_ekfac", "1.000000"]
    assert ekfac[3].startswith("lds +0.100 [+0.100, +0.100]")
    assert ekfac[4:7] == ["1.00 / 4.00", "0.250", "100 / 100 |"]
    skipped = next(r for r in rows if "dattri_lissa" in r)
    assert "not run: dattri's LiSSA iterates Hessian-vector products" in skipped
