"""The curvature benchmark's helpers (the script: ``python -m studies.curvature --quick``)."""

from __future__ import annotations

import numpy as np
import torch

from studies.curvature import available, bootstrap, explicit_corr


def test_available_skips_estimators_without_config():
    have, skipped = available(["explicit", "lissa", "arnoldi", "no_such_estimator"])
    assert have == ["explicit", "lissa", "arnoldi"] and skipped == ["no_such_estimator"]


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.1, size=300)
    same = bootstrap(a, a + rng.normal(0, 0.01, size=300))
    assert same["lissa_low"] < a.mean() < same["lissa_high"] and same["within_or_above"]
    assert same["diff_low"] < 0 < same["diff_high"]
    worse = bootstrap(a, a - 0.2)
    assert not worse["within_or_above"] and worse["diff_high"] < 0
    assert bootstrap(a, a + 0.2)["within_or_above"]  # above the interval counts


def test_explicit_corr_is_rowwise_pearson():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 50, generator=gen)
    assert abs(explicit_corr(3 * ref + 1, ref) - 1) < 1e-9
    assert abs(explicit_corr(-ref, ref) + 1) < 1e-9
