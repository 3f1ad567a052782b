"""Fact tracing: the fact world, the LM problem, BM25, the fact metrics, candidate filtering,
and end-to-end runs of ``facts`` and ``hf_lm``."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import run
from bench.metrics.fact_tracing import fact_tracing, ranking, reciprocal_rank_recall
from bench.truths.tail_patch import TailPatcher
from estimators.bm25 import BM25
from estimators.grad_dot import GradDot
from estimators.problem import IGNORE
from tasks import lm
from tasks.fact_world import RELATIONS, generate
from tasks.facts import Facts, build_tokenizer

TINY_TASK = dict(world={"n_entities": 12, "n_prior_docs": 4, "n_queries": 6},
                 model={"layers": 1, "width": 32, "heads": 2, "intermediate": 64},
                 train={"epochs": 2})


@pytest.fixture(scope="module")
def tiny_facts():
    """``(task, problem)``: a tiny facts LM trained for 2 epochs (float32)."""
    torch.set_num_threads(1)
    task = Facts(**TINY_TASK)
    model = task.build_model(0)
    return task, task.problem(model, task.fit(model, seed=0))


def test_world_is_deterministic_and_proponents_state_the_fact():
    a, b = (generate(n_entities=20, n_queries=20, seed=3) for _ in range(2))
    assert a.documents == b.documents and a.queries == b.queries
    assert generate(n_entities=20, n_queries=20, seed=4).documents != a.documents
    forward = [q for q in a.queries if q["set"] == "forward"]
    flipped = [q for q in a.queries if q["set"] == "flipped"]
    assert len(forward) == len(flipped) == 20
    for f, r in zip(forward, flipped, strict=True):
        assert f["proponents"] == r["proponents"] and len(f["proponents"]) == 3
        subject, relation = f["fact"].split("|")
        assert r["target"] == subject
        for d in f["proponents"]:
            assert subject in a.documents[d] and f["target"] in a.documents[d]
            assert (int(a.names.index(subject)), relation) in a.doc_facts[d]
            assert f["prompt"] not in a.documents[d]  # the query template is held out
        # each proponent uses another template for the fact
        templates = {t for d in f["proponents"] for t in RELATIONS[relation][1]
                     if t.format(s=subject, o=f["target"]) in a.documents[d]}
        assert len(templates) == 3
    # every fact is stated exactly docs_per_fact times
    counts = {}
    for facts in a.doc_facts:
        for fact in facts:
            counts[fact] = counts.get(fact, 0) + 1
    assert set(counts.values()) == {3} and len(counts) == 20 * len(RELATIONS)


def test_flipped_targets_never_continue_their_prompt_context_in_training():
    world = generate(n_entities=30, n_queries=60, seed=1)
    for q in world.queries:
        if q["set"] == "flipped":
            context = " ".join(q["prompt"].split()[-2:])
            assert not any(f"{context} {q['target']}" in d for d in world.documents), q


def test_world_rejects_too_many_docs_per_fact():
    with pytest.raises(ValueError, match="docs_per_fact"):
        generate(docs_per_fact=4)


def test_lm_loss_and_measurement_match_token_log_probs(tiny_facts):
    task, problem = tiny_facts
    batch = problem.collate_fn([problem.queries[0], problem.queries[1], problem.train[0]])
    logits = problem.outputs(problem.model, batch).detach()
    logp = torch.log_softmax(logits, -1)
    expected = []
    for i in range(3):
        labels = batch["labels"][i]
        expected.append(sum(float(logp[i, t - 1, labels[t]]) for t in range(1, len(labels))
                            if labels[t] != IGNORE))
    assert torch.allclose(problem.measure(logits, batch), torch.tensor(expected), atol=1e-4)
    assert torch.allclose(problem.loss(logits, batch), -torch.tensor(expected), atol=1e-4)
    # a query predicts exactly its target tokens
    q = task.world.queries[0]
    n_target = len(task.tokenizer(q["target"], add_special_tokens=False)["input_ids"])
    assert int((problem.queries[0]["labels"] != IGNORE).sum()) == n_target
    tokens = problem.queries[0]["input_ids"][problem.queries[0]["labels"] != IGNORE]
    assert task.tokenizer.decode(tokens) == q["target"]


def test_ranking_metrics_closed_form():
    scores = torch.tensor([[0.9, 0.1, 0.5, float("nan")],
                           [0.0, 0.0, 0.0, 0.3]])
    order = ranking(scores)
    assert order[0].tolist() == [0, 2, 1, 3]  # NaN last
    assert order[1].tolist() == [3, 0, 1, 2]  # ties by index
    rr, recall = reciprocal_rank_recall(order, [[1, 3], [2]], k=2)
    assert rr.tolist() == [1 / 3, 1 / 4] and recall.tolist() == [0.0, 0.0]
    rr, recall = reciprocal_rank_recall(order, [[2, 1], []], k=3)
    assert rr[0] == 0.5 and recall[0] == 1.0 and math.isnan(rr[1])


def test_tail_patch_matches_first_order_prediction(tiny_facts):
    """For a small lr, f(θ + Δθ_d) − f(θ) ≈ ∇f · Δθ_d for the Adam step Δθ_d on d."""
    task, problem = tiny_facts
    model = task.build_model(0).double()
    model.load_state_dict({k: v.double() for k, v in problem.model.state_dict().items()})
    p64 = task.problem(model, problem.checkpoints)
    spec = dataclasses.replace(p64.tail_patch, lr=1e-5)
    assert set(spec.adam["exp_avg_sq"]) == {n for n, _ in model.named_parameters()}
    patcher = TailPatcher(p64, spec)
    doc, query = 5, 2
    update = patcher.step(doc)
    batch = p64.collate_fn([p64.queries[query]])
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(p64.query_measure(model, batch).sum(), list(params.values()))
    predicted = sum(float((g * update[n]).sum()) for n, g in zip(params, grads, strict=True))
    actual = float(patcher.effects(doc, [query])[0])
    assert abs(actual - predicted) <= 0.02 * abs(predicted) + 1e-12
    # the parameters are restored after the step
    assert torch.equal(p64.query_measure(model, batch).detach().double(),
                       patcher.base[[query]])


def test_tail_patch_step_is_torch_adam_step_with_zeroed_first_moment(tiny_facts):
    task, problem = tiny_facts
    spec = problem.tail_patch
    adam = spec.adam
    assert adam["step"] == problem.checkpoints[-1].step and adam["betas"] == (0.9, 0.98)
    patcher = TailPatcher(problem, spec)
    doc = 3
    update = patcher.step(doc)
    model = problem.model
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=spec.lr, betas=adam["betas"],
                                 eps=adam["eps"])
    for name, p in params.items():
        optimizer.state[p] = {"step": torch.tensor(adam["step"]),
                              "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": adam["exp_avg_sq"][name].clone()}
    batch = problem.collate_fn([problem.train[doc]])
    model.zero_grad()
    spec.step_loss(model, batch).backward()
    optimizer.step()
    try:
        for name, p in params.items():
            delta = p.detach() - before[name]
            expected = update.get(name, torch.zeros_like(delta))
            assert torch.allclose(delta, expected, rtol=1e-3, atol=1e-7), name
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(before[name])
        model.zero_grad(set_to_none=True)


def test_bm25_finds_the_documents_that_state_the_fact():
    task = Facts(lds=None)  # the default world; BM25 needs no trained model
    problem = task.problem(task.build_model(0), [])
    scores = BM25().score(problem)
    assert scores.shape == (problem.n_queries, problem.n_train)
    metrics, per_query = fact_tracing(problem, scores, k=10)
    assert metrics["recall@10"] >= 0.8 and metrics["mrr"] >= 0.8
    assert per_query["query_set"][0] == "forward" and per_query["query_set"][-1] == "flipped"


def test_bm25_needs_text(tiny_mlp):
    problem, _ = tiny_mlp
    with pytest.raises(ValueError, match="text of training examples"):
        BM25().score(problem)


def test_candidate_filtering_keeps_candidate_scores(tiny_facts):
    _, problem = tiny_facts
    full = GradDot(chunk_size=16).score(problem)
    for retriever in ("tfidf", "bm25"):
        filtered = GradDot(chunk_size=16, candidates={"retriever": retriever, "k": 5})
        scores = filtered.score(problem)
        scored = ~torch.isnan(scores)
        assert (scored.sum(1) == 5).all()
        assert torch.allclose(scores[scored], full[scored], rtol=1e-4, atol=1e-6)
    everything = GradDot(chunk_size=16, candidates={"retriever": "tfidf", "k": problem.n_train})
    assert torch.allclose(everything.score(problem), full, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="retriever"):
        GradDot(candidates={"retriever": "dense", "k": 3})


def test_facts_run_records_fact_metrics(make_cfg):
    record = run(make_cfg("facts", "estimator=grad_dot"))
    for key in ("mrr", "recall@3", "tail_patch", "tail_patch_random", "tail_patch_gradnorm",
                "flipped_mrr", "flipped_recall@3", "flipped_tail_patch", "proponent_share",
                "flipped_proponent_share", "query_accuracy"):
        assert key in record and record[key] is not None and np.isfinite(record[key]), key
    out = make_cfg("facts").hydra.runtime.output_dir
    frame = pd.read_csv(f"{out}/per_query.csv")
    assert len(frame) == 12 and set(frame["query_set"]) == {"forward", "flipped"}
    assert {"rr", "recall@3", "tail_patch", "tail_patch_random"} <= set(frame.columns)


def test_facts_gpt_neox_builds():
    task = Facts(**{**TINY_TASK, "model": {**TINY_TASK["model"], "arch": "gpt_neox"}})
    model = task.build_model(0)
    problem = task.problem(model, [])
    batch = problem.collate_fn([problem.train[0], problem.train[1]])
    assert problem.train_loss(model, batch).shape == (2,)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_hf_lm_end_to_end(make_cfg, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate([
        "Ada Lovelace was born in London .", "Ada Lovelace wrote notes on engines .",
        "Alan Turing was born in Maida Vale .", "Cities include London and Paris .",
        "Grace Hopper worked on compilers ."])]
    queries = [{"prompt": "The birthplace of Ada Lovelace is", "target": "London",
                "proponents": ["d0"]},
               {"prompt": "Turing was born in", "target": "Maida Vale", "proponents": ["d2"]},
               {"prompt": "London is the birthplace of", "target": "Ada Lovelace",
                "proponents": ["d0"], "set": "flipped"}]
    write_jsonl(tmp_path / "corpus.jsonl", corpus)
    write_jsonl(tmp_path / "queries.jsonl", queries)
    tokenizer = build_tokenizer([r["text"] for r in corpus] +
                                [q["prompt"] + " " + q["target"] for q in queries])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    record = run(make_cfg("hf_lm", "estimator=grad_dot", f"task.model={tmp_path / 'model'}",
                          f"task.corpus={tmp_path / 'corpus.jsonl'}",
                          f"task.queries={tmp_path / 'queries.jsonl'}", "task.tail_patch_lr=0.01",
                          "fact_metrics.k=2", "num_threads=1"))
    for key in ("mrr", "recall@2", "tail_patch", "tail_patch_random", "flipped_mrr",
                "query_accuracy"):
        assert key in record and np.isfinite(record[key]), key
    bm25 = run(make_cfg("hf_lm", "estimator=bm25", f"task.model={tmp_path / 'model'}",
                        f"task.corpus={tmp_path / 'corpus.jsonl'}",
                        f"task.queries={tmp_path / 'queries.jsonl'}", "fact_metrics.k=2"))
    assert bm25["mrr"] == 1.0 and "tail_patch" not in bm25


def test_hf_lm_reports_bad_jsonl(tmp_path):
    from tasks.hf_lm import CORPUS_FIELDS, QUERY_FIELDS, read_jsonl

    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"q.jsonl:1 lacks the field 'target'"):
        read_jsonl(tmp_path / "q.jsonl", QUERY_FIELDS, "queries")
    with pytest.raises(ValueError) as err:
        read_jsonl(tmp_path / "missing.jsonl", CORPUS_FIELDS, "corpus")
    assert err.value.in_config().startswith(f"corpus={tmp_path / 'missing.jsonl'} does not")


def test_facts_export_reloads_as_hf_lm(tiny_facts, tmp_path):
    """The exported model, tokenizer and jsonl files give hf_lm the same problem."""
    from tasks.hf_lm import HFLM

    task, problem = tiny_facts
    task.export(problem.model, tmp_path)
    other = HFLM(model=str(tmp_path), corpus=str(tmp_path / "corpus.jsonl"),
                 queries=str(tmp_path / "queries.jsonl"), max_length=task.max_length)
    model = other.build_model(0)
    reloaded = other.problem(model, other.fit(model, 0))
    assert reloaded.proponents == problem.proponents
    assert reloaded.query_groups == problem.query_groups
    for i in (0, len(problem.queries) - 1):
        assert torch.equal(reloaded.queries[i]["input_ids"], problem.queries[i]["input_ids"])
        assert torch.equal(reloaded.queries[i]["labels"], problem.queries[i]["labels"])
    assert reloaded.modules == "blocks" and problem.modules is None  # hf_lm: blocks only
    a = GradDot(chunk_size=32, modules="all").score(problem)
    b = GradDot(chunk_size=32, modules="all").score(reloaded)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_lm_collate_pads_right():
    collate = lm.make_collate(pad_id=0)
    batch = collate([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7])},
                     {"input_ids": torch.tensor([8]), "labels": torch.tensor([IGNORE])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE] * 3


@pytest.mark.slow
def test_default_facts_model_learns_the_forward_facts(make_cfg):
    """The default task (a few minutes on 2 cores) reaches ≥ 50 % forward exact match, and
    BM25 recalls the proponents (the issue's acceptance checks)."""
    record = run(make_cfg("facts", "estimator=bm25", "num_threads=1",
                          "fact_metrics.with_tail_patch=false", tiny=False))
    assert record["query_accuracy"] >= 0.5
    assert record["recall@10"] >= 0.8
