"""The spine's acceptance checks at full task size (slow: minutes; `pytest -m slow`)."""

from __future__ import annotations

import math

import pytest

from bench.cli import run

pytestmark = pytest.mark.slow


def test_explicit_on_logistic_regression_tracks_leave_one_out(make_cfg):
    # The influence function is close to exact for a convex model (Koh & Liang 2017, Fig. 2).
    record = run(make_cfg("digits_logreg", "estimator=explicit", tiny=False))
    assert record["loo_pearson"] >= 0.9


def test_grad_cos_on_the_mlp_gives_a_finite_lds(make_cfg):
    record = run(make_cfg("digits_mlp", "estimator=grad_cos", tiny=False))
    assert math.isfinite(record["lds"]) and math.isfinite(record["lds_sem"])
