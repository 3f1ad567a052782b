"""Conv2d in the gradient engine and in K-FAC/EK-FAC (Grosse & Martens 2016), checked against
torch.func per-sample gradients and Hessians on a tiny float64 CNN, against the exact solver
where the Kronecker factorisation is exact, and every gradient estimator on the CNN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.utils.data import TensorDataset

from estimators import kfac_factors
from estimators.arnoldi import Arnoldi
from estimators.ekfac import EKFAC, KFAC
from estimators.explicit import Explicit
from estimators.grad_cos import GradCos
from estimators.grad_dot import GradDot
from estimators.gradients import GradientEngine, tracked_layers
from estimators.lissa import LiSSA
from estimators.problem import (
    AttributionProblem,
    Checkpoint,
    cross_entropy_sum,
    sample_categorical,
)
from estimators.tracin import TracIn
from estimators.trackstar import TrackStar
from estimators.trak import TRAK

LR = 0.01


def margin(logits, batch):
    y = batch[1]
    correct = logits.gather(1, y[:, None]).squeeze(1)
    return correct - torch.logsumexp(logits.scatter(1, y[:, None], float("-inf")), dim=1)


def tiny_cnn() -> nn.Module:
    """Reflect padding with a bias, stride 2 with dilation 2 and no bias, ``padding='same'``,
    then a linear head: 6×6 -> 6×6 -> 3×3 -> 3×3 -> 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, bias=False), nn.Tanh(),
        nn.Conv2d(4, 4, 1, padding="same"), nn.Flatten(), nn.Linear(36, 3),
    ).double()


def cnn_problem() -> AttributionProblem:
    """The tiny CNN after three Adam steps (one checkpoint with its optimizer state)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    model = tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(3):
        optimizer.zero_grad()
        cross_entropy_sum(model(x[:24]), y[:24]).mean().backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = Checkpoint(state, lr=LR, step=3,
                            optimizer_state=copy.deepcopy(optimizer.state_dict()))
    return AttributionProblem(
        model=model.eval(), train=TensorDataset(x[:24], y[:24]),
        queries=TensorDataset(x[24:], y[24:]), collate_fn=None,
        outputs=lambda m, b: m(b[0]), loss=lambda out, b: cross_entropy_sum(out, b[1]),
        measure=margin, l2=1e-2, checkpoints=[checkpoint],
        sample_targets=lambda out, b, gen: (b[0], sample_categorical(out, b[1], gen)),
    )


@pytest.fixture(scope="module")
def cnn() -> AttributionProblem:
    return cnn_problem()


def engine_layout(problem: AttributionProblem, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``{parameter name: [n, *shape]}`` -> ``[n, P]`` in the engine's [W (C_in·kh·kw) | b]
    layout, built by hand from the parameter names (not by the engine's Layer)."""
    parts = []
    for name, module in problem.model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            w = values[f"{name}.weight"]
            w = w.reshape(w.shape[0], w.shape[1], -1)
            if module.bias is not None:
                w = torch.cat([w, values[f"{name}.bias"][..., None]], dim=-1)
            parts.append(w.flatten(1))
    return torch.cat(parts, dim=1)


def reference_gradients(problem: AttributionProblem, which: str) -> torch.Tensor:
    """``[n, P]`` per-sample gradients by torch.func (vmap of grad)."""
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    x, y = (problem.train if which == "train" else problem.queries).tensors
    fn = problem.loss if which == "train" else problem.measure

    def one(p, xi, yi):
        batch = (xi[None], yi[None])
        return fn(functional_call(problem.model, p, (batch[0],)), batch)[0]

    return engine_layout(problem, vmap(grad(one), in_dims=(None, 0, 0))(params, x, y))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].item()


def test_per_example_gradients_equal_torch_func(cnn):
    engine = GradientEngine(cnn.model)
    assert [(layer.name, layer.shape) for layer in engine.layers] == [
        ("0", (3, 2 * 9 + 1)), ("2", (4, 3 * 9)), ("4", (4, 4 + 1)), ("6", (3, 37))]
    x, y = cnn.train.tensors
    grads = engine.flatten(engine.gradients(cnn.train_loss, (x, y)))
    torch.testing.assert_close(grads, reference_gradients(cnn, "train"))


def test_layout_roundtrip_of_conv_weights(cnn):
    engine = GradientEngine(cnn.model)
    named = engine.as_named_parameters(engine.parameters())
    for name, value in cnn.model.named_parameters():
        torch.testing.assert_close(named[name], value.detach())
    conv = engine.layers[1]
    joined = conv.join(conv.module.weight.detach() * 2)
    torch.testing.assert_close(conv.split(joined)["weight"], conv.module.weight.detach() * 2)


def test_grouped_convolutions_are_refused_in_one_sentence():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Conv2d layer '0' has groups=2.*`modules`"):
        tracked_layers(model)
    assert [layer.name for layer in tracked_layers(model, r"^2$")] == ["2"]


def test_kfac_factors_are_patch_and_position_statistics(cnn):
    """A = mean over examples and output positions of ā āᵀ (patches cut by hand, not by
    unfold), S = (1/N) Σₙ Σₜ gₙₜ gₙₜᵀ (Grosse & Martens 2016, with the |T| of the SUD
    approximation in S, as kronfluence)."""
    model = cnn.model
    conv = model[2]  # stride 2, padding 2, dilation 2, no bias
    x, y = cnn.train.tensors
    with torch.no_grad():
        inp = model[1](model[0](x))
    padded = nn.functional.pad(inp, (2, 2, 2, 2))
    patches = torch.stack([padded[:, :, 2 * i:2 * i + 5:2, 2 * j:2 * j + 5:2].flatten(1)
                           for i in range(3) for j in range(3)], dim=1)  # [N, T, C·k·k]
    out = conv(inp).detach().requires_grad_(True)
    head = nn.Sequential(*list(model)[3:])
    (g,) = torch.autograd.grad(cross_entropy_sum(head(out), y).sum(), out)
    g = g.flatten(2).transpose(1, 2)  # [N, T, C_out]
    engine = GradientEngine(model)
    loss_fn = kfac_factors.fisher_loss(cnn, "empirical", 0, 0)
    blocks = list(range(kfac_factors.n_blocks(cnn, 7)))
    payloads = [kfac_factors.covariance_pass(cnn, engine, loss_fn, 7, blocks)]
    layer = next(layer for layer in engine.layers if layer.name == "2")
    a_factor, s_factor = (kfac_factors.covariance(payloads, "2", layer.shape, which, cnn.n_train)
                          for which in ("A", "S"))
    torch.testing.assert_close(a_factor, torch.einsum("nti,ntj->ij", patches, patches) / (24 * 9))
    torch.testing.assert_close(s_factor, torch.einsum("nto,ntp->op", g, g) / 24)


def single_position_problem(n_inputs: int = 30) -> AttributionProblem:
    """One Conv2d whose kernel covers its whole input (one output position) with the summed
    squared loss ½‖y − t‖² and residuals √C_out eₖ (each input repeated C_out times): the
    empirical Fisher equals the GGN, (1/N) Σ ā āᵀ ⊗ I, exactly Kronecker-factored, so K-FAC
    and EK-FAC must equal ``explicit`` (the construction of tests/test_ekfac.py, in a conv)."""
    c_in, k, c_out = 2, 2, 3
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Conv2d(c_in, c_out, k).double()
    x = torch.randn(n_inputs, c_in, k, k, generator=gen, dtype=torch.float64) + 0.5
    x = x.repeat_interleave(c_out, dim=0)
    residuals = math.sqrt(c_out) * torch.eye(c_out, dtype=torch.float64).repeat(n_inputs, 1)
    with torch.no_grad():
        targets = model(x).flatten(1) - residuals
    xq = torch.randn(5, c_in, k, k, generator=gen, dtype=torch.float64)
    yq = torch.randn(5, c_out, generator=gen, dtype=torch.float64)

    def loss(out, batch):
        return 0.5 * (out - batch[1]).pow(2).sum(-1)

    return AttributionProblem(
        model=model, train=TensorDataset(x, targets), queries=TensorDataset(xq, yq),
        collate_fn=None, outputs=lambda m, b: m(b[0]).flatten(1), loss=loss,
        measure=lambda out, b: -loss(out, b), l2=1e-2,
    )


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_kronecker_exact_conv_matches_explicit(cls):
    problem = single_position_problem()
    exact = Explicit(damping=1e-3).score(problem)
    scores = cls(fisher="empirical", damping=1e-3).score(problem)
    torch.testing.assert_close(scores, exact, rtol=1e-6, atol=1e-8 * exact.abs().max().item())


def test_explicit_hessian_on_a_cnn_equals_torch_func(cnn):
    """``explicit`` maps θ to the conv weights through Layer.split: its Hessian must be the
    one torch.func forms over the model's own parameters."""
    params = {k: v.detach() for k, v in cnn.model.named_parameters()}
    x, y = cnn.train.tensors
    names = list(params)

    def objective(flat):
        sizes = [params[n].numel() for n in names]
        p = {n: v.view_as(params[n]) for n, v in zip(names, flat.split(sizes), strict=True)}
        return cross_entropy_sum(functional_call(cnn.model, p, (x,)), y).mean()

    flat = torch.cat([params[n].flatten() for n in names])
    h = hessian(objective)(flat) + cnn.l2 * torch.eye(flat.numel(), dtype=torch.float64)
    # reorder [P, P] from parameter order into the engine's layout
    index = engine_layout(cnn, {n: torch.arange(params[n].numel()).view(1, *params[n].shape)
                                + sum(params[m].numel() for m in names[:names.index(n)])
                                for n in names})[0]
    h = h[index][:, index] + 1.0 * torch.eye(flat.numel(), dtype=torch.float64)
    g_train, g_query = reference_gradients(cnn, "train"), reference_gradients(cnn, "queries")
    expected = -(g_query @ torch.linalg.solve(h, g_train.T))
    scores = Explicit(curvature="hessian", damping=1.0).score(cnn)  # H is indefinite
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9)


def test_first_order_estimators_on_a_cnn(cnn):
    g_train, g_query = reference_gradients(cnn, "train"), reference_gradients(cnn, "queries")
    dot = -(g_query @ g_train.T)
    torch.testing.assert_close(GradDot(chunk_size=7).score(cnn), dot)
    cos = -(nn.functional.normalize(g_query, dim=1) @ nn.functional.normalize(g_train, dim=1).T)
    torch.testing.assert_close(GradCos().score(cnn), cos)
    torch.testing.assert_close(TracIn().score(cnn), LR * dot)
    # a Kronecker projection as large as every layer keeps each side whole: exact
    engine = GradientEngine(cnn.model)
    projected = GradDot(projection_dim=4 * engine.num_params).score(cnn)
    torch.testing.assert_close(projected, dot.to(projected.dtype), rtol=1e-4, atol=1e-6)


def test_trackstar_optimizer_correction_on_conv_weights(cnn):
    """Adam's second moment of a 4-d conv weight enters in the engine's layout."""
    opt = cnn.checkpoints[-1].optimizer_state
    names = [n for n, _ in cnn.model.named_parameters()]
    v = {n: opt["state"][i]["exp_avg_sq"][None] for i, n in enumerate(names)}
    bias = 1 - opt["param_groups"][0]["betas"][1] ** 3
    scale = (engine_layout(cnn, v)[0] / bias + 1e-8).rsqrt()
    g_train, g_query = reference_gradients(cnn, "train"), reference_gradients(cnn, "queries")
    expected = -((g_query * scale) @ (g_train * scale).T)
    estimator = TrackStar(hessian="none", unit_norm=False, projection_dim=None)
    scores = estimator.score(cnn)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4,
                               atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("make", [
    lambda: LiSSA(depth=40, power_iterations=5, batch_size=24, damping=0.3),
    lambda: Arnoldi(rank=80, iterations=120, damping=0.3),
], ids=["lissa", "arnoldi"])
def test_iterative_inverses_on_a_cnn_approach_explicit(cnn, make):
    exact = Explicit(damping=0.3).score(cnn)
    scores = make().score(cnn)
    assert pearson(scores, exact) > 0.99


@pytest.mark.parametrize(("make", "least"), [
    (lambda: EKFAC(), 0.7), (lambda: KFAC(fisher="empirical"), 0.6),
    (lambda: TRAK(n_models=1, projection_dim=256), 0.5),
    (lambda: TrackStar(projection_dim=64), 0.3),
], ids=["ekfac", "kfac", "trak", "trackstar"])
def test_other_estimators_on_a_cnn_follow_explicit(cnn, make, least):
    """Approximations of it (measured here: EK-FAC 0.80, K-FAC 0.74, TRAK 0.74, TrackStar
    0.47 Pearson with explicit on this barely trained CNN)."""
    scores = make().score(cnn)
    assert scores.shape == (cnn.n_queries, cnn.n_train) and torch.isfinite(scores).all()
    assert pearson(scores, Explicit(damping=1e-3).score(cnn)) > least
