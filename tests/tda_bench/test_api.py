"""The ``tda_bench`` facade: estimators by config name with the CLI's defaults, the problem
helpers against the shipped tasks' problems, the metrics against the harness's."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import tda_bench
from estimators.ekfac import EKFAC
from tests.helpers import _composed

NAMES = sorted(p.stem for p in __import__("pathlib").Path(
    tda_bench.estimator_group.CONF_DIR, "estimator").glob("*.yaml"))


def test_the_estimators_are_the_config_group():
    assert tda_bench.estimator_names() == NAMES
    assert tda_bench.EKFAC is EKFAC and "EKFAC" in dir(tda_bench)
    with pytest.raises(AttributeError):
        tda_bench.NotAnEstimator  # noqa: B018


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_those_of_the_command_line(name, tmp_path):
    """``estimator_config(name)`` is the CLI's composed ``cfg.estimator`` for the same seed
    and cache_dir; without a cache_dir nothing is cached."""
    cfg = _composed((f"estimator={name}", "logger=none", "seed=3",
                     f"cache_dir={tmp_path}"))
    cli = OmegaConf.to_container(cfg.estimator, resolve=True)
    api = tda_bench.estimator_config(name, seed=3, cache_dir=str(tmp_path))
    if "scratch_dir" in cli:  # a peer's: the run folder on the command line, else a temporary one
        assert api.pop("scratch_dir") is None and cli.pop("scratch_dir").endswith("peer_scratch")
    assert api == cli
    plain = tda_bench.estimator_config(name)
    assert plain.get("cache_dir") is None and plain.get("index_dir") is None
    assert all(plain[k] == 0 for k in ("seed", "projection_seed") if k in plain)


def test_overrides_and_errors_name_the_argument():
    est = tda_bench.estimator("ekfac", damping=1e-2, fisher="empirical")
    assert isinstance(est, EKFAC) and est.damping == 1e-2 and est.cache.directory is None
    with pytest.raises(ValueError, match=r"^estimator 'ekfac' has no argument dampng; its "
                                         r"arguments are: .*damping"):
        tda_bench.estimator("ekfac", dampng=1.0)
    with pytest.raises(ValueError, match=r"^unknown estimator 'ekfak'; the estimators are: "):
        tda_bench.estimator("ekfak")


def test_a_hydra_of_the_caller_is_left_as_it_was(tmp_path):
    tda_bench.estimator_group._composed.cache_clear()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=tda_bench.estimator_group.CONF_DIR,
                               version_base="1.3"):
        tda_bench.estimator("grad_dot")
        assert compose("config", overrides=["seed=5"]).seed == 5
    assert not GlobalHydra.instance().is_initialized()


def test_an_estimator_yaml_on_the_search_path(tmp_path):
    """A YAML of your own (reusing the shared blocks) is an estimator by its name."""
    (tmp_path / "estimator").mkdir()
    (tmp_path / "estimator" / "my_dot.yaml").write_text(
        "defaults:\n  - base/gradient@_here_\n  - base/projection@_here_\n  - _self_\n\n"
        "_target_: estimators.grad_dot.GradDot\nchunk_size: 7\n")
    est = tda_bench.estimator("my_dot", searchpath=[str(tmp_path)])
    assert type(est).__name__ == "GradDot" and est.chunk_size == 7


# --- problems ------------------------------------------------------------------------


def test_classification_problem_is_the_digits_problem():
    """A trained digits_logreg model: classification_problem's scores (datasets or tensor
    pairs) are the task's problem's scores, bit for bit."""
    from tasks.digits_logreg import DigitsLogReg

    task = DigitsLogReg(n_train=80, n_queries=5, epochs=2)
    model = task.build_model(0)
    task.fit(model, seed=0)
    reference = task.problem(model, [])
    estimator = tda_bench.estimator("explicit")
    estimator.fit(reference)
    expected = estimator.score(reference)
    for train, queries in ((task.train_set, task.query_set),
                           (task.train_set.tensors, task.query_set.tensors)):
        problem = tda_bench.classification_problem(model, train, queries, l2=task.l2)
        estimator.fit(problem)
        assert torch.equal(estimator.score(problem), expected)
    ekfac = tda_bench.estimator("ekfac")  # the true Fisher: labels sampled from the model
    ekfac.fit(problem)
    assert ekfac.score(problem).shape == (5, 80)


def test_classification_problem_refuses_what_it_cannot_use():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match=r"^l2 must be >= 0"):
        tda_bench.classification_problem(model, (x, y), (x, y), l2=-1)
    with pytest.raises(ValueError, match=r"^queries must pair x \[N, \.\.\.\] with integer "):
        tda_bench.classification_problem(model, (x, y), (x, y + 0.5), l2=0.0)
    with pytest.raises(ValueError, match=r"^measure must be one of loss, prediction"):
        tda_bench.regression_problem(model, (x, y.double()), (x, y.double()), l2=0.0,
                                     measure="mse")
    with pytest.raises(ValueError, match=r"^train must be a dataset of \(x, y\) pairs"):
        tda_bench.classification_problem(model, 3, (x, y), l2=0.0)
    pairs = tda_bench.classification_problem(model, list(zip(x, y, strict=True)),
                                             (x.numpy(), y.numpy()), l2=0.0)
    assert pairs.n_train == 6 and isinstance(pairs.queries[0][0], torch.Tensor)
    problem = tda_bench.classification_problem(model.double(), (x, y.float()), (x, y), l2=0.0)
    assert problem.train[0][0].dtype == torch.float64  # x follows the model's dtype
    assert problem.train[0][1].dtype == torch.long  # integral float labels are classes


def test_causal_lm_problem_is_the_hf_lm_problem(tmp_path):
    """The same saved model, documents and queries: causal_lm_problem gives the hf_lm
    task's scores, and its fact-tracing metrics."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.facts import build_tokenizer
    from tasks.hf_lm import HFLM

    docs = ["Ada Lovelace was born in London .", "Alan Turing was born in Maida Vale .",
            "Grace Hopper worked on compilers ."]
    queries = [("The birthplace of Ada Lovelace is", "London"),
               ("Turing was born in", "Maida Vale")]
    tokenizer = build_tokenizer(docs + [f"{p} {t}" for p, t in queries])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id)).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.jsonl").write_text("".join(
        json.dumps({"id": f"d{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "queries.jsonl").write_text("".join(
        json.dumps({"prompt": p, "target": t, "proponents": [f"d{i}"]}) + "\n"
        for i, (p, t) in enumerate(queries)))
    task = HFLM(model=str(tmp_path / "model"), corpus=str(tmp_path / "corpus.jsonl"),
                queries=str(tmp_path / "queries.jsonl"))
    reference = task.problem(task.build_model(0), [])

    problem = tda_bench.causal_lm_problem(model, tokenizer, docs, queries,
                                          proponents=[[0], [1]])
    grad_dot = tda_bench.estimator("grad_dot")
    expected = grad_dot.score(reference)
    scores = grad_dot.score(problem)
    torch.testing.assert_close(scores, expected)
    assert scores.shape == (2, 3) and problem.query_text == reference.query_text
    bm25 = tda_bench.estimator("bm25")
    bm25.fit(problem)
    assert tda_bench.metrics.mrr(bm25.score(problem), problem) == 1.0
    with pytest.raises(ValueError, match=r"^queries\[0\] must be a \(prompt, target\) pair"):
        tda_bench.causal_lm_problem(model, tokenizer, docs, ["no target"])


# --- metrics -------------------------------------------------------------------------


def test_metrics_are_the_harness_metrics():
    from bench.metrics.correlation import loo_per_query
    from bench.metrics.fact_tracing import fact_tracing

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 20, generator=gen)
    truth = {"indices": torch.arange(0, 20, 2), "effects": torch.randn(10, 4, generator=gen)}
    pearson, spearman = loo_per_query(scores, truth["indices"], truth["effects"])
    assert tda_bench.metrics.loo(scores, truth) == pytest.approx(pearson.mean())
    assert tda_bench.metrics.loo(scores.numpy(), truth, "spearman") == pytest.approx(
        spearman.mean())
    proponents = [[0, 3], [5], [7, 8, 9], [19]]
    problem = tda_bench.AttributionProblem(
        model=torch.nn.Linear(1, 1), train=[0] * 20, queries=[0] * 4, collate_fn=None,
        outputs=None, loss=None, measure=None, proponents=proponents)
    expected, _ = fact_tracing(problem, scores, k=5)
    assert tda_bench.metrics.mrr(scores, proponents) == pytest.approx(expected["mrr"])
    assert tda_bench.metrics.recall(scores, problem, k=5) == pytest.approx(expected["recall@5"])
    with pytest.raises(ValueError, match=r"^scores must be a \[n_queries, n_train\] matrix"):
        tda_bench.metrics.loo(scores[0], truth)
    with pytest.raises(ValueError, match=r"^proponents must hold one list per query \(4\)"):
        tda_bench.metrics.mrr(scores, proponents[:2])
    flipped = torch.zeros(20, dtype=torch.bool)
    flipped[:5] = True
    assert tda_bench.metrics.mislabel(-torch.arange(20.0), flipped)["mislabel_auc"] == 1.0


@pytest.mark.parametrize("kind", ["one_logit", "regression"])
def test_the_true_fisher_samplers_match_their_losses(kind):
    """Targets drawn by ``sample_targets`` make the Fisher the loss's curvature (the GGN):
    E[(∂ℓ/∂o)²] = ∂²ℓ/∂o² for a one-logit classifier and for the squared error."""
    model = torch.nn.Linear(2, 1, dtype=torch.float64)
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 0]) if kind == "one_logit" else torch.tensor([0.5, -1.0],
                                                                      dtype=torch.float64)
    make = (tda_bench.classification_problem if kind == "one_logit"
            else tda_bench.regression_problem)
    problem = make(model, (x, y), (x, y), l2=0.0)
    batch = (x.repeat(20_000, 1), y.repeat(20_000))
    out = model(batch[0]).detach().requires_grad_(True)
    sampled = problem.sample_targets(out, batch, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(problem.loss(out, sampled).sum(), out)
    fisher = grad.pow(2).view(20_000, 2).mean(0)
    o = out.detach()[:2, 0]
    curvature = (torch.sigmoid(o) * torch.sigmoid(-o) if kind == "one_logit"
                 else torch.full((2,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(fisher, curvature, rtol=0.05, atol=0)
