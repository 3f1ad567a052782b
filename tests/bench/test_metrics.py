"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.metrics import evaluate, lds_per_query, loo_per_query, mean_sem


def test_lds_matches_hand_computed_spearman():
    # predicted sums over subsets: [1, 2, 3]; measured outputs [10, 30, 20] -> ranks 1,3,2
    scores = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    masks = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    outputs = torch.tensor([[10.0], [30.0], [20.0]])
    # Spearman = 1 - 6 Σd² / (n(n²-1)) = 1 - 6·2/24
    assert lds_per_query(scores, masks, outputs)[0] == pytest.approx(0.5)


def test_loo_matches_hand_computed_pearson_and_spearman():
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0]])  # training point 0 is not among the removed
    indices = torch.tensor([1, 2, 3])
    effects = torch.tensor([[2.0], [4.0], [7.0]])
    pearson, spearman = loo_per_query(scores, indices, effects)
    # cov = 5, var_x = 2, var_y = 114/9 (sums of squared deviations)
    assert pearson[0] == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert spearman[0] == pytest.approx(1.0)


def test_negatively_signed_scores_give_negative_correlation():
    scores = torch.tensor([[-1.0, -2.0, -3.0]])
    pearson, _ = loo_per_query(scores, torch.tensor([0, 1, 2]), torch.tensor([[1.0], [2.0], [3.0]]))
    assert pearson[0] == pytest.approx(-1.0)


def test_mean_sem_skips_undefined_queries():
    mean, sem = mean_sem(np.array([1.0, 2.0, 3.0, np.nan]))
    assert mean == pytest.approx(2.0)
    assert sem == pytest.approx(1.0 / math.sqrt(3))


def test_constant_predictions_are_nan_not_zero():
    scores = torch.zeros(2, 4)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    outputs = torch.randn(3, 2)
    assert np.isnan(lds_per_query(scores, masks, outputs)).all()


def test_evaluate_reports_every_available_metric():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 10, generator=gen)
    truths = {
        "lds": {"masks": torch.rand(6, 10, generator=gen) > 0.5,
                "outputs": torch.randn(6, 3, generator=gen)},
        "loo": {"indices": torch.arange(5), "effects": torch.randn(5, 3, generator=gen)},
    }
    metrics, per_query = evaluate(scores, truths)
    assert set(metrics) == {"lds", "lds_sem", "loo_pearson", "loo_spearman"}
    assert set(per_query) == {"lds", "loo_pearson", "loo_spearman"}
    assert all(v.shape == (3,) for v in per_query.values())
    assert metrics["lds"] == pytest.approx(np.nanmean(per_query["lds"]))


def test_top_share_of_a_point_mass_is_one_and_of_a_flat_row_its_fraction():
    from bench.metrics.sparsity import top_share

    scores = torch.zeros(3, 200)
    scores[0, 5] = -2.0  # one example carries everything (sign does not matter)
    scores[1] = 1.0  # flat: the top 1 % (2 of 200) carry 1 %
    assert top_share(scores).tolist()[:2] == pytest.approx([1.0, 0.01])
    assert math.isnan(top_share(scores)[2])  # all zero: undefined
