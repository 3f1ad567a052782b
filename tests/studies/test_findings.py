"""results/FINDINGS.md's verdicts on synthetic records whose effects are known."""

from __future__ import annotations

import numpy as np
import pandas as pd

from studies import findings
from tests.helpers import write_run


def facts_run(root, estimator, seed, mrr, tail, share, width=None, rng=None):
    """A facts record with forward and flipped per-query values (4 queries each)."""
    command = f"tda-bench task=facts estimator={estimator} seed={seed}"
    task = "facts"
    if width is not None:
        command += f" task.model.width={width}"
        root = root / f"w{width}"
    noise = rng.normal(0, 0.01, 8)
    out = write_run(root, task, estimator, seed, np.full(8, 0.0), command=command,
                    extra={"mrr": mrr, "tail_patch": tail})
    frame = pd.DataFrame({"query": np.arange(8), "query_set": ["forward"] * 4 + ["flipped"] * 4,
                          "rr": mrr + noise, "tail_patch": tail + noise,
                          "proponent_share": np.r_[np.full(4, share), np.full(4, 0.0)] + noise,
                          "top1pct_share": (0.1 if width == 32 else 0.3) + noise})
    frame.to_csv(out / "per_query.csv", index=False)


def test_claims_that_hold_reproduce_and_claims_that_do_not_are_said_so(tmp_path):
    rng = np.random.default_rng(0)
    board, scale = tmp_path / "board", tmp_path / "scale"
    for seed in (0, 1, 2):
        write_run(board, "digits", "ekfac", seed, 0.50 + rng.normal(0, 0.01, 20), seconds=1.0)
        write_run(board, "digits", "lissa", seed, 0.50 + rng.normal(0, 0.01, 20), seconds=100.0)
        facts_run(board, "bm25", seed, 0.9, -0.05, 0.2, rng=rng)
        facts_run(board, "grad_cos", seed, 0.4, 0.02, 0.1, rng=rng)
        facts_run(board, "trackstar", seed, 0.4, 0.02, 0.1, rng=rng)  # no better than grad_cos
        facts_run(board, "ekfac", seed, 0.5, 0.02, 0.1, rng=rng)
        facts_run(board, "grad_dot", seed, 0.3, 0.02, 0.1, rng=rng)
        for width, gap in ((32, -0.1), (128, -0.01)):
            facts_run(scale, "bm25", seed, 0.9, 0.02 + gap, 0.2, width, rng)
            facts_run(scale, "grad_cos", seed, 0.4, 0.02, 0.1, width, rng)
            facts_run(scale, "ekfac", seed, 0.5, 0.02, 0.1, width, rng)
    found = {f.claim: f for f in findings.findings(board, scale, "model.width")}
    verdicts = [f.verdict for f in found.values()]
    assert verdicts == ["reproduced", "reproduced", "reproduced", "not reproduced",
                        "reproduced", "reproduced"]  # claims in FINDINGS.md order
    text = findings.markdown(list(found.values()), ["--out", "x"])
    assert text.count("**reproduced**") == 5 and "**not reproduced**" in text
