"""``studies.trackstar_projection``: the table and paired differences from archived records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from studies.trackstar_projection import VARIANTS, main


def _record(root, variant, seed, mrr):
    folder = root / variant / f"{seed}_facts_trackstar_seed{seed}"
    folder.mkdir(parents=True)
    command = " ".join(["tda-bench", "task=facts", "estimator=trackstar", f"seed={seed}",
                        *VARIANTS[variant]])
    folder.joinpath("metrics.json").write_text(json.dumps({
        "task": "facts", "estimator": "trackstar", "seed": seed, "command": command,
        "date": f"2026-01-01T00:00:0{seed}+00:00", "commit": "abc", "fit_seconds": 1.0,
        "score_seconds": 2.0, "mrr": float(np.mean(mrr)), "recall@10": 0.5}))
    pd.DataFrame({"query": range(len(mrr)), "mrr": mrr, "recall@10": [0.5] * len(mrr)}) \
        .to_csv(folder / "per_query.csv", index=False)


def test_table_and_paired_difference_from_records(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(3):
        base = rng.uniform(0.2, 0.4, size=20)
        _record(tmp_path, "dense_1024", seed, base)
        _record(tmp_path, "kronecker_1024", seed, base - 0.1)  # 0.1 worse on every query
    out = tmp_path / "table.md"
    main(["--records", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "| sparse_1024 |" in text and "not run" in text  # a variant without records
    row = next(line for line in text.splitlines()
               if line.startswith("| structure at d = 1024 | kronecker_1024 | dense_1024 | mrr"))
    assert "-0.100 [-0.100, -0.100] | A < B |" in row
    main(["--records", str(tmp_path), "--out", str(out)])
    assert out.read_text() == text  # rebuilt byte for byte
