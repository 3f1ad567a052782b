"""hf_lm's model is identified by the content of its files, not its path; nothing is trained
or copied into the cache; the transformer blocks are the default layers."""

from __future__ import annotations

import logging

import torch

from bench.cli import run
from tests.tasks.test_facts import build_tokenizer, write_jsonl

CORPUS = ["Ada Lovelace was born in London .", "Alan Turing was born in Maida Vale .",
          "Cities include London and Paris .", "Grace Hopper worked on compilers ."]
QUERIES = [{"prompt": "The birthplace of Ada Lovelace is", "target": "London",
            "proponents": ["d0"]},
           {"prompt": "Turing was born in", "target": "Maida Vale", "proponents": ["d1"]}]


def save_model(folder, tokenizer, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_replacing_the_weights_at_the_same_path_changes_the_scores(make_cfg, tmp_path, caplog):
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t}
                                            for i, t in enumerate(CORPUS)])
    write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    tokenizer = build_tokenizer(CORPUS + [q["prompt"] + " " + q["target"] for q in QUERIES])
    folder = tmp_path / "model"
    args = ["estimator=ekfac", f"task.model={folder}", f"task.corpus={tmp_path / 'corpus.jsonl'}",
            f"task.queries={tmp_path / 'queries.jsonl'}", "fact_metrics.k=2", "num_threads=1",
            "fact_metrics.with_tail_patch=false"]
    save_model(folder, tokenizer, seed=0)
    with caplog.at_level(logging.INFO, logger="tda-bench"):
        first_cfg = make_cfg("hf_lm", *args)
        run(first_cfg)
    first = torch.load(f"{first_cfg.hydra.runtime.output_dir}/scores.pt")
    assert "Training" not in caplog.text and "Loaded the given hf_lm model" in caplog.text
    assert not (tmp_path / "cache" / "models").exists()  # no state-dict copy in the cache
    factors = sorted((tmp_path / "cache" / "factors").glob("*.pt"))
    assert len(factors) == 2
    again_cfg = make_cfg("hf_lm", *args)  # same files: the cached factors serve
    run(again_cfg)
    assert torch.equal(torch.load(f"{again_cfg.hydra.runtime.output_dir}/scores.pt"), first)
    assert sorted((tmp_path / "cache" / "factors").glob("*.pt")) == factors

    save_model(folder, tokenizer, seed=1)  # new weights, same path
    second_cfg = make_cfg("hf_lm", *args)
    run(second_cfg)
    second = torch.load(f"{second_cfg.hydra.runtime.output_dir}/scores.pt")
    assert not torch.allclose(second, first)
    assert len(list((tmp_path / "cache" / "factors").glob("*.pt"))) == 4  # refitted


def test_default_layers_are_the_transformer_blocks(tmp_path):
    from estimators.grad_dot import GradDot
    from tasks.hf_lm import HFLM

    write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t}
                                            for i, t in enumerate(CORPUS)])
    write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    tokenizer = build_tokenizer(CORPUS + [q["prompt"] + " " + q["target"] for q in QUERIES])
    save_model(tmp_path / "model", tokenizer, seed=0)
    task = HFLM(model=str(tmp_path / "model"), corpus=str(tmp_path / "corpus.jsonl"),
                queries=str(tmp_path / "queries.jsonl"))
    model = task.build_model(0)
    problem = task.problem(model, task.fit(model, 0))
    names = GradDot().engine(problem).names
    assert names and all(n.startswith("model.layers.") for n in names)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block; no lm_head
    assert "lm_head" in GradDot(modules="all").engine(problem).names
    checkpoint = problem.checkpoints[-1].state_dict
    assert all(checkpoint[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())
