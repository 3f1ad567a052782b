"""The shared per-example-gradient engine and the first-order estimators, checked against
per-example gradients computed independently with torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from estimators.arnoldi import Arnoldi
from estimators.ekfac import EKFAC
from estimators.explicit import Explicit
from estimators.grad_cos import GradCos
from estimators.grad_dot import GradDot
from estimators.gradients import GradientEngine, tracked_layers
from estimators.lissa import LiSSA
from estimators.problem import AttributionProblem, cross_entropy_sum
from estimators.trak import TRAK


def reference_gradients(problem: AttributionProblem, which: str) -> torch.Tensor:
    """``[n, P]`` per-example gradients via torch.func, in the engine's [W | b] layout."""
    model = problem.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = problem.train if which == "train" else problem.queries
    x, y = data.tensors
    fn = problem.loss if which == "train" else problem.measure

    def one(p, xi, yi):
        batch = (xi[None], yi[None])
        return fn(functional_call(model, p, (batch[0],)), batch)[0]

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return torch.cat([torch.cat([grads[f"{n}.weight"], grads[f"{n}.bias"][..., None]], -1)
                      .flatten(1) for n in layers], dim=1)


def test_grad_dot_matches_torch_func(tiny_mlp):
    problem, _ = tiny_mlp
    g_train = reference_gradients(problem, "train")
    g_query = reference_gradients(problem, "queries")
    expected = -(g_query @ g_train.T)
    scores = GradDot(chunk_size=7).score(problem)  # a chunk size that does not divide n
    assert scores.shape == (problem.n_queries, problem.n_train)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


def test_grad_cos_is_cosine_of_torch_func_gradients(tiny_mlp):
    problem, _ = tiny_mlp
    g_train = nn.functional.normalize(reference_gradients(problem, "train"), dim=1)
    g_query = nn.functional.normalize(reference_gradients(problem, "queries"), dim=1)
    scores = GradCos().score(problem)
    torch.testing.assert_close(scores.double(), -(g_query @ g_train.T), rtol=1e-5, atol=1e-6)
    assert scores.abs().max() <= 1 + 1e-6


def test_layer_wise_scores_sum_to_total(tiny_mlp):
    problem, _ = tiny_mlp
    estimator = GradDot(per_layer=True)
    total = estimator.score(problem)
    assert estimator.layer_scores.shape == (2, problem.n_queries, problem.n_train)
    torch.testing.assert_close(estimator.layer_scores.sum(0), total)


def test_flatten_roundtrip_and_parameters(tiny_mlp):
    problem, _ = tiny_mlp
    engine = GradientEngine(problem.model)
    theta = engine.parameters()
    assert theta.numel() == engine.num_params == 64 * 8 + 8 + 8 * 10 + 10
    named = engine.as_named_parameters(theta)
    for name, value in problem.model.named_parameters():
        torch.testing.assert_close(named[name], value.detach())
    flat = torch.randn(3, engine.num_params, dtype=torch.float64)
    torch.testing.assert_close(engine.flatten(engine.unflatten(flat)), flat)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double().eval()


def test_conv1d_per_example_gradients_of_a_transformer():
    model = tiny_gpt2()
    ids = torch.randint(0, 31, (3, 8), generator=torch.Generator().manual_seed(1))

    def summed_nll(m, batch):
        logits = m(input_ids=batch).logits[:, :-1]
        return cross_entropy_sum(logits, batch[:, 1:])

    engine = GradientEngine(model, "mlp_only")
    assert engine.names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                            "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    grads = engine.gradients(summed_nll, ids)
    for i in range(3):
        model.zero_grad()
        summed_nll(model, ids[i:i + 1]).sum().backward()
        fc = model.transformer.h[1].mlp.c_fc  # Conv1D: weight [d_in, d_out]
        expected = torch.cat([fc.weight.grad.T, fc.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(grads["transformer.h.1.mlp.c_fc"][i], expected)


def test_module_filter_regex_and_clear_error():
    model = tiny_gpt2()
    assert [layer.name for layer in tracked_layers(model, r"attn\.c_attn")] == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="No linear or convolutional layer"):
        tracked_layers(model, "no_such_layer")


def test_non_finite_gradient_is_reported(tiny_mlp):
    problem, _ = tiny_mlp
    engine = GradientEngine(problem.model)
    x, y = problem.train.tensors
    bad = x[:4].clone()
    bad[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"examples \[2\]"):
        engine.gradients(problem.train_loss, (bad, y[:4]))


@pytest.mark.parametrize("make", [
    lambda: GradDot(projection_dim=16),
    lambda: TRAK(n_models=1, projection_dim=16),
    lambda: LiSSA(depth=2, power_iterations=2, batch_size=16),
    lambda: Arnoldi(rank=2, iterations=4),
    lambda: Explicit(),
    lambda: EKFAC(),
], ids=["grad_dot", "trak", "lissa", "arnoldi", "explicit", "ekfac"])
@pytest.mark.parametrize("training", [True, False])
def test_estimators_leave_the_model_in_the_mode_they_found(tiny_mlp, make, training):
    """Estimators differentiate in eval mode (:func:`estimators.problem.eval_mode`) and
    hand the model back in train or eval mode as it came."""
    problem, _ = tiny_mlp
    problem.model.train(training)
    try:
        make().score(problem)
        assert problem.model.training is training
    finally:
        problem.model.eval()
