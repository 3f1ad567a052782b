"""The task interface: measuring queries leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

from tasks.digits_logreg import DigitsLogReg


@pytest.mark.parametrize("training", [True, False])
def test_measure_queries_keeps_the_models_mode(training):
    task = DigitsLogReg(n_train=40, n_queries=5)
    model = task.build_model(0).train(training)
    values = task.measure_queries(model)
    assert values.shape == (5,) and values.dtype == torch.float64
    assert model.training is training
