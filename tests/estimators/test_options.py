"""Validated argument values: the shared checks, the gradient and projection options, and
estimators that build them from their flat (Hydra) keyword arguments."""

from __future__ import annotations

import dataclasses

import pytest

from estimators.arnoldi import Arnoldi
from estimators.bm25 import BM25
from estimators.ekfac import EKFAC, KFAC
from estimators.explicit import Explicit
from estimators.grad_dot import GradDot
from estimators.lissa import LiSSA
from estimators.options import (
    GradientOptions,
    OptionError,
    ProjectionOptions,
    bounded,
    choice,
    flag,
    natural,
    number,
    positive,
)
from estimators.tracin import TracIn
from estimators.trackstar import TrackStar
from estimators.trak import TRAK


@pytest.mark.parametrize("check,value,message", [
    (lambda v: positive("damping", v), "abc", "damping must be a number, got 'abc'"),
    (lambda v: positive("damping", v), True, "damping must be a number, got True"),
    (lambda v: positive("damping", v), float("nan"), "damping must be a number, got nan"),
    (lambda v: positive("damping", v), 0.0, "damping must be positive, got 0.0"),
    (lambda v: positive("chunk_size", v, integer=True), 0,
     "chunk_size must be a positive integer, got 0"),
    (lambda v: positive("chunk_size", v, integer=True), 2.5,
     "chunk_size must be a positive integer, got 2.5"),
    (lambda v: positive("chunk_size", v, integer=True), "64",
     "chunk_size must be a positive integer, got '64'"),
    (lambda v: number("seed", v, integer=True), 0.5, "seed must be an integer, got 0.5"),
    (lambda v: positive("query_rank", v, integer=True, allow_none=True), -1,
     "query_rank must be a positive integer or None, got -1"),
    (lambda v: bounded("damping", v, 0), -1.0, "damping must be >= 0, got -1.0"),
    (lambda v: bounded("damping", v, 0), "abc", "damping must be a number, got 'abc'"),
    (lambda v: bounded("mix", v, 0, 1), 1.5, "mix must be in [0, 1], got 1.5"),
    (lambda v: bounded("scale_margin", v, 1), 0.5, "scale_margin must be >= 1, got 0.5"),
    (lambda v: choice("hessian", v, ("none", "train", "task")), "fisher",
     "hessian must be none, train or task, got 'fisher'"),
    (lambda v: flag("per_layer", v), "false", "per_layer must be True or False, got 'false'"),
    (lambda v: natural("seed", v), -1, "seed must be a non-negative integer, got -1"),
    (lambda v: bounded("fraction", v, 0, 1, open_low=True, open_high=True), 1.0,
     "fraction must be in (0, 1), got 1.0"),
])
def test_checks_raise_one_sentence_naming_the_key(check, value, message):
    with pytest.raises(ValueError) as err:
        check(value)
    assert str(err.value) == message


def test_checks_return_plain_values():
    assert positive("chunk_size", 1e3, integer=True) == 1000
    assert type(positive("chunk_size", 1e3, integer=True)) is int
    assert positive("damping", 1) == 1.0 and type(positive("damping", 1)) is float
    assert positive("scale", None, allow_none=True) is None
    assert bounded("damping", 0, 0) == 0.0
    assert number("seed", -3, integer=True) == -3
    assert choice("curvature", "ggn", ("ggn", "hessian")) == "ggn"
    assert flag("per_layer", False) is False


def test_gradient_options_validate_on_construction():
    options = GradientOptions("mlp_only", 64.0, True)
    assert options == GradientOptions("mlp_only", 64, True) and type(options.chunk_size) is int
    with pytest.raises(ValueError, match="^chunk_size must be a positive integer, got 0$"):
        GradientOptions(chunk_size=0)
    with pytest.raises(ValueError, match="per_layer must be True or False"):
        GradientOptions(per_layer="yes")
    with pytest.raises(ValueError, match="modules must be .* not a valid regular expression"):
        GradientOptions(modules="(mlp")
    with pytest.raises(ValueError, match="modules must be"):
        GradientOptions(modules=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.chunk_size = 8


def test_projection_options_validate_on_construction():
    assert not ProjectionOptions().enabled and ProjectionOptions(dim=64).enabled
    with pytest.raises(ValueError, match="^projection_dim must be a positive integer or None"):
        ProjectionOptions(dim=0)
    with pytest.raises(ValueError, match="^projection_kind must be rademacher or gaussian"):
        ProjectionOptions(kind="sparse")
    with pytest.raises(ValueError,
                       match="^projection_structure must be kronecker, dense or sparse"):
        ProjectionOptions(structure="tree")
    with pytest.raises(ValueError, match="^projection_seed must be a non-negative integer"):
        ProjectionOptions(seed="zero")
    with pytest.raises(ValueError, match="^index_dir must be a directory path"):
        ProjectionOptions(index_dir=3)


def test_estimators_keep_flat_arguments_as_validated_options(tmp_path):
    estimator = GradDot(modules="mlp_only", chunk_size=32, projection_dim=16,
                        projection_seed=4, index_dir=str(tmp_path))
    assert estimator.gradient_options == GradientOptions("mlp_only", 32, False)
    assert estimator.projection_options == ProjectionOptions(16, "rademacher", 4, "kronecker",
                                                             str(tmp_path))
    # the config keys stay readable, and assigning one re-validates its options value
    assert (estimator.modules, estimator.chunk_size, estimator.projection_dim,
            estimator.index_dir) == ("mlp_only", 32, 16, str(tmp_path))
    estimator.chunk_size = 8
    assert estimator.gradient_options.chunk_size == 8
    with pytest.raises(ValueError, match="^chunk_size must be a positive integer, got 0$"):
        estimator.chunk_size = 0
    # subclasses forward the shared arguments to GradientEstimator
    for cls in (Explicit, KFAC, EKFAC, LiSSA, Arnoldi, TracIn, TRAK, TrackStar):
        assert cls(modules="mlp_only", chunk_size=7).gradient_options.chunk_size == 7


@pytest.mark.parametrize("make,message", [
    (lambda: GradDot(chunk_size=0), "chunk_size must be a positive integer, got 0"),
    (lambda: GradDot(per_layer=True, projection_dim=8, projection_structure="dense"),
     'per_layer scores need GradDot(projection_structure="kronecker")'),
    (lambda: LiSSA(damping="abc"), "damping must be a number, got 'abc'"),
    (lambda: LiSSA(depth=True), "depth must be a positive integer, got True"),
    (lambda: LiSSA(hvp="fisher"), "hvp must be ggn or hessian, got 'fisher'"),
    (lambda: LiSSA(projection_dim=8), "lissa preconditions exact gradients"),
    (lambda: EKFAC(candidates={"k": 5}), "ekfac scores every training example"),
    (lambda: KFAC(damping=-1.0), "KFAC: damping must be >= 0 or None, got -1.0"),
    (lambda: Arnoldi(batch_size=0), "batch_size must be a positive integer, got 0"),
    (lambda: Explicit(curvature="fisher"), "curvature must be ggn or hessian"),
    (lambda: TRAK(projection_dim=None), "projection_dim must be a positive integer, got None"),
    (lambda: TRAK(per_layer=True), "trak has no layer-wise scores"),
    (lambda: TrackStar(mix=2), "mix must be in [0, 1], got 2"),
    (lambda: TrackStar(per_layer=True), "trackstar mixes layers"),
    (lambda: TrackStar(unit_norm="no"), "TrackStar: unit_norm must be True or False, got 'no'"),
    (lambda: BM25(k1="abc"), "k1 must be a number, got 'abc'"),
])
def test_estimators_reject_bad_arguments_in_one_sentence(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)


def test_errors_name_the_argument_in_the_callers_terms():
    """One error, two wordings: a Python caller reads the class and its arguments, the
    command line reads config keys (the CLI renders ``in_config``)."""
    with pytest.raises(OptionError) as err:
        EKFAC(damping="abc")
    assert str(err.value) == "EKFAC: damping must be a number or None, got 'abc'"
    assert err.value.in_config() == "estimator.damping must be a number or null, got 'abc'"
    advice = OptionError("no sample_targets; use {fisher=empirical} or {damping=0.01}; "
                         "{{literal}}", owner="EKFAC", scope="estimator")
    assert str(advice) == ('EKFAC: no sample_targets; use EKFAC(fisher="empirical") or '
                           "EKFAC(damping=0.01); {literal}")
    assert advice.in_config() == ("no sample_targets; use estimator.fisher=empirical or "
                                  "estimator.damping=0.01; {literal}")
    bare = OptionError("{seed} must be set")  # no owner: a top-level key
    assert str(bare) == bare.in_config() == "seed must be set"


def test_the_true_fisher_advice_names_the_argument(tiny_mlp):
    import dataclasses

    problem, _ = tiny_mlp
    without = dataclasses.replace(problem, sample_targets=None)
    with pytest.raises(OptionError) as err:
        EKFAC(fisher="true").fit(without)
    assert str(err.value).endswith('use EKFAC(fisher="empirical").')
    assert err.value.in_config().endswith("use estimator.fisher=empirical.")


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_explicit_on_a_singular_curvature_advises_what_helps(tiny_mlp, curvature):
    """Undamped, without L2, the tiny MLP's curvature is singular (more parameters than
    example-outputs): the advice is damping, and another curvature only for the Hessian (a
    GGN is PSD: 'use curvature=ggn' is no advice when it is the GGN)."""
    import dataclasses

    problem, _ = tiny_mlp
    singular = dataclasses.replace(problem, l2=0.0)
    with pytest.raises(OptionError) as err:
        Explicit(curvature=curvature, damping=0.0).fit(singular)
    text = str(err.value)
    assert text.startswith(f"Explicit: The damped {curvature} matrix is not positive definite")
    assert "raise damping above" in text and "Explicit(damping=" in text
    assert ('Explicit(curvature="ggn")' in text) == (curvature == "hessian")
    assert ("estimator.curvature=ggn" in err.value.in_config()) == (curvature == "hessian")
