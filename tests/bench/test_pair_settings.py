"""``pair_settings``: a sweep's estimator settings for one task/estimator pair."""

from __future__ import annotations

import pytest

from bench.stages import resolve
from estimators.options import OptionError


def test_the_pair_gets_its_settings_and_other_pairs_do_not(make_cfg):
    settings = "pair_settings={digits_mlp/grad_dot: {chunk_size: 7}}"
    assert resolve(make_cfg("digits_mlp", "estimator=grad_dot", settings)).estimator \
        .chunk_size == 7
    other = resolve(make_cfg("digits_mlp", "estimator=grad_cos", settings)).estimator
    assert other.chunk_size == 256


def test_a_bad_pair_setting_is_refused_before_any_work(make_cfg):
    with pytest.raises(OptionError, match="pair_settings must be a mapping"):
        resolve(make_cfg("digits_mlp", "estimator=grad_dot", "pair_settings=3"))
    with pytest.raises(Exception, match="chunk_sz"):
        resolve(make_cfg("digits_mlp", "estimator=grad_dot",
                         "pair_settings={digits_mlp/grad_dot: {chunk_sz: 7}}"))
