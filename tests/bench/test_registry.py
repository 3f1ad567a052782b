"""The plug-in seams: metric specs (lookup, templates, groups) and ground-truth kinds
(settings checked on construction, unknown kinds refused before any work)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import stages
from bench.metrics import Metric, evaluate, is_cost, is_headline, is_printed, registry, spec_for
from bench.metrics.registry import register_metric
from bench.truths import truth_kinds
from bench.truths.lds import LDS


def test_specs_are_found_by_record_key_including_templates():
    assert spec_for("lds").role == "headline" and spec_for("lds").needs == "lds"
    assert spec_for("recall@10").name == "recall@{k}" and is_headline("recall@3")
    assert is_cost("seconds") and is_cost("peak_rss_mb") and is_cost("index_mb")
    assert not spec_for("peak_rss_mb").higher_is_better
    assert spec_for("flipped_mrr") is None  # a query group's variant has no spec of its own
    assert is_printed("flipped_mrr") and is_printed("lds_sem") and not is_printed("lds_ceiling")
    assert spec_for("mrr").column_for("mrr") == "rr"


def test_evaluate_averages_per_query_metrics_per_group_and_scalars_once(monkeypatch):
    monkeypatch.setattr(registry, "_METRICS", dict(registry._METRICS))  # undone after the test
    register_metric(Metric("toy_per_query", needs="toy", order=5,
                           values=lambda scores, t: scores[:, 0].numpy()))
    register_metric(Metric("toy_scalar", needs="toy", role="info", order=6,
                           values=lambda scores, t: 7.0))
    scores = torch.tensor([[1.0], [2.0], [3.0], [np.nan]])
    groups = {"forward": [0, 1], "flipped": [2, 3]}
    metrics, per_query = evaluate(scores, {"toy": {}}, groups)
    assert metrics["toy_per_query"] == 1.5 and metrics["flipped_toy_per_query"] == 3.0
    assert metrics["toy_scalar"] == 7.0 and "flipped_toy_scalar" not in metrics
    assert list(per_query) == ["query_set", "toy_per_query"]
    assert list(per_query["query_set"]) == ["forward", "forward", "flipped", "flipped"]
    plain, _ = evaluate(scores, {"toy": {}})
    assert plain["toy_per_query"] == 2.0  # no groups: all finite queries


def test_a_clashing_metric_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_metric(Metric("lds", needs="loo"))


def test_ground_truth_settings_are_checked_on_construction():
    assert set(truth_kinds()) >= {"lds", "loo", "pbrf", "removal", "proponents", "tail_patch",
                                  "mislabel"}
    with pytest.raises(ValueError) as err:
        LDS(subset=3)
    assert str(err.value) == ("LDS: unknown setting(s) subset; the settings are fraction, seed, "
                              "seeds, subsets")
    assert err.value.in_config().startswith("unknown setting(s) task.lds.subset;")
    with pytest.raises(ValueError, match=r"^LDS: fraction must be in \(0, 1\), got 1.5$"):
        LDS(fraction=1.5)


def test_an_unknown_task_key_or_an_inapplicable_kind_fails_before_any_work(make_cfg,
                                                                           monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("resolve must not train")

    monkeypatch.setattr("tasks.digits.DigitsTask.fit", no_training)
    with pytest.raises(ValueError, match="task.ldss is neither a setting of DigitsMLP nor"):
        stages.resolve(make_cfg("digits_mlp", "+task.ldss.subsets=3"))
    with pytest.raises(ValueError, match="not convex"):
        stages.resolve(make_cfg("digits_mlp", "task.loo={n: 3}"))
    job = stages.resolve(make_cfg("digits_logreg"))
    assert set(job.kinds) >= {"lds", "loo", "pbrf", "removal"}
