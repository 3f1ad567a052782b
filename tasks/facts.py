"""``facts``: fact tracing on a small causal LM trained from scratch (Chang et al. 2024).

A generated fact world (:mod:`tasks.fact_world`, fixed by ``split_seed``) gives the
training corpus and two query sets: forward cloze queries ("The employer of Dravin Korlath
is" → "Helix") and the same facts flipped (object first, the subject as target). Each query
knows its **proponents**, the documents that state its fact; they are its ground truth
(``bench.fact_metrics``: MRR, recall@k, tail-patch). With ``task.lds`` set the LM is also
retrained on random document subsets (the LDS of Park et al. 2023; one Lightning fit per
model, so the units run as ``stage=ground_truth`` shards; ``facts_lds`` is a world and model
small enough for 2 CPU cores). Not convex, so no LOO.

The model is a transformers Llama (or GPT-NeoX) causal LM, a few layers of width ~128,
trained from scratch with Lightning and AdamW on the token-averaged NLL; its word-level
tokenizer is built from the world's text with the ``tokenizers`` library. With
``export_dir`` set, the trained model, the tokenizer (``save_pretrained``), ``corpus.jsonl``
and ``queries.jsonl`` are written there, ready for the ``hf_lm`` task.

The problem's capabilities: ``proponents`` (per query), ``query_groups``
(``forward``/``flipped`` indices), ``tail_patch`` (peak lr, AdamW's final state, step loss)
and ``task_metrics`` (``query_accuracy``: exact match of the forward queries;
``flipped_query_accuracy``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from estimators.options import OptionError, bounded, choice, literal, natural, positive
from estimators.problem import AttributionProblem, Checkpoint
from tasks import lm
from tasks.base import lightning_fit
from tasks.fact_world import generate

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
SETTINGS = {  # the keys of the task's world, model and train blocks
    "world": ("n_entities", "docs_per_fact", "facts_per_doc", "n_prior_docs", "n_queries"),
    "model": ("arch", "layers", "width", "heads", "intermediate"),
    "train": ("epochs", "batch_size", "lr", "weight_decay", "betas", "warmup", "final_lr_ratio"),
}


def build_tokenizer(texts: list[str]):
    """A word-level ``tokenizers`` tokenizer over ``texts`` (sorted vocabulary: deterministic),
    wrapped as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.WhitespaceSplit()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


class Facts(lm.LMTask):
    """Fact tracing on a tiny LM (see module docstring).

    Args:
        world: :func:`tasks.fact_world.generate` settings (``n_entities``, ``docs_per_fact``,
            ``facts_per_doc``, ``n_prior_docs``, ``n_queries``).
        model: ``arch`` (``llama`` | ``gpt_neox``), ``layers``, ``width``, ``heads``,
            ``intermediate``.
        train: ``epochs``, ``batch_size``, ``lr`` (peak), ``weight_decay``, ``betas``,
            ``warmup`` (fraction of steps), ``final_lr_ratio``.
        max_length: tokens per document or query (longer ones are cut).
        tail_patch_lr: learning rate of the tail-patch step (None: the peak training lr).
        export_dir: where to save model, tokenizer and jsonl files (None: nowhere).
        **task: ``split_seed`` (the world's seed), ``lds`` (retraining on document subsets;
            None: none), ``loo`` (must stay null), ``device``.
    """

    VERSION = 2  # 2: flipped prompts no longer end in a training context of the subject

    def __init__(self, world: dict | None = None, model: dict | None = None,
                 train: dict | None = None, max_length: int = 64,
                 tail_patch_lr: float | None = None, export_dir: str | None = None, **task):
        super().__init__(**task)
        self.world_cfg = dict(world or {})
        self.model_cfg = {"arch": "llama", "layers": 2, "width": 128, "heads": 4,
                          "intermediate": 256, **(model or {})}
        self.train_cfg = {"epochs": 20, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.0,
                          "betas": (0.9, 0.98), "warmup": 0.05, "final_lr_ratio": 0.1,
                          **(train or {})}
        self._check_settings()
        self.max_length = positive("max_length", max_length, integer=True)
        self.tail_patch_lr = positive("tail_patch_lr", tail_patch_lr, allow_none=True)
        self.export_dir = export_dir
        self.world = generate(**self.world_cfg, seed=self.split_seed)
        self.query_texts = [q["prompt"] + " " + q["target"] for q in self.world.queries]
        self.tokenizer = build_tokenizer(self.world.documents + self.query_texts)
        encode = self._encode
        tok = self.tokenizer
        self.train_data = lm.encode_documents(self.world.documents, encode, tok.bos_token_id,
                                              tok.eos_token_id, self.max_length)
        self.query_data = lm.encode_queries([q["prompt"] for q in self.world.queries],
                                            [q["target"] for q in self.world.queries], encode,
                                            tok.bos_token_id, self.max_length)

    def _check_settings(self) -> None:
        """Refuses an unknown or out-of-range ``world``, ``model`` or ``train`` value."""
        for group, values in (("world", self.world_cfg), ("model", self.model_cfg),
                              ("train", self.train_cfg)):
            unknown = sorted(set(values) - set(SETTINGS[group]))
            if unknown:
                raise OptionError(f"{{{group}.{unknown[0]}}} is not a setting; {group} takes "
                                  f"{', '.join(SETTINGS[group])}")
        for key in ("n_entities", "docs_per_fact", "facts_per_doc", "n_queries"):
            positive(f"world.{key}", self.world_cfg.get(key, 1), integer=True)
        natural("world.n_prior_docs", self.world_cfg.get("n_prior_docs", 0))
        m, t = self.model_cfg, self.train_cfg
        choice("model.arch", m["arch"], ("llama", "gpt_neox"))
        for key in ("layers", "width", "heads", "intermediate"):
            positive(f"model.{key}", m[key], integer=True)
        if m["width"] % m["heads"]:
            raise OptionError(f"{{model.width}}={m['width']} must be a multiple of "
                              f"{{model.heads}}={m['heads']}")
        positive("train.epochs", t["epochs"], integer=True)
        positive("train.batch_size", t["batch_size"], integer=True)
        positive("train.lr", t["lr"])
        bounded("train.weight_decay", t["weight_decay"], 0)
        bounded("train.warmup", t["warmup"], 0, 1)
        bounded("train.final_lr_ratio", t["final_lr_ratio"], 0, 1)
        if len(t["betas"]) != 2:
            raise OptionError(f"{{train.betas}} must be two numbers, got {literal(t['betas'])}")
        for beta in t["betas"]:
            bounded("train.betas", beta, 0, 1, open_high=True)

    def build_model(self, seed: int) -> nn.Module:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

        c, tok = self.model_cfg, self.tokenizer
        common = dict(vocab_size=len(tok), hidden_size=c["width"], num_hidden_layers=c["layers"],
                      num_attention_heads=c["heads"], intermediate_size=c["intermediate"],
                      max_position_embeddings=self.max_length, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if c["arch"] == "llama":
                return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=c["heads"]))
            return GPTNeoXForCausalLM(GPTNeoXConfig(**common, use_parallel_residual=True))

    def fit(self, model: nn.Module, seed: int, indices: Tensor | None = None,
            progress: bool = False) -> list[Checkpoint]:
        t = self.train_cfg
        n = self.n_train if indices is None else len(indices)
        steps = int(t["epochs"]) * math.ceil(n / min(int(t["batch_size"]), n))
        module = lm.LMModule(model, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]),
                             betas=tuple(t["betas"]), warmup=float(t["warmup"]),
                             final_lr_ratio=float(t["final_lr_ratio"]), total_steps=steps)
        start = time.perf_counter()
        checkpoints = lightning_fit(module, self.train_data, indices=indices,
                                    batch_size=int(t["batch_size"]), epochs=int(t["epochs"]),
                                    seed=seed, device=self.device, progress=progress,
                                    collate_fn=lm.make_collate(self.tokenizer.pad_token_id))
        log.info("facts: trained %d steps in %.1f s", steps, time.perf_counter() - start)
        model.eval()
        return checkpoints

    def query_sets(self) -> dict[str, list[int]]:
        sets: dict[str, list[int]] = {"forward": [], "flipped": []}
        for i, q in enumerate(self.world.queries):
            sets[q["set"]].append(i)
        return sets

    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        fields: dict = {"proponents": [list(q["proponents"]) for q in self.world.queries],
                        "query_groups": self.query_sets()}
        if checkpoints:
            lr = self.tail_patch_lr if self.tail_patch_lr is not None else self.train_cfg["lr"]
            fields["tail_patch"] = lm.tail_patch_spec(model, checkpoints, float(lr))
            correct = lm.exact_match(model, self.query_data, lm.make_collate(
                self.tokenizer.pad_token_id), device=next(model.parameters()).device)
            sets = fields["query_groups"]
            fields["task_metrics"] = {
                "query_accuracy": float(correct[sets["forward"]].float().mean()),
                "flipped_query_accuracy": float(correct[sets["flipped"]].float().mean()),
            }
            if self.export_dir:
                self.export(model, Path(self.export_dir))
        return lm.lm_problem(model, checkpoints, self.train_data, self.query_data,
                             self.tokenizer.pad_token_id, train_text=list(self.world.documents),
                             query_text=self.query_texts, **fields)

    def export(self, model: nn.Module, directory: Path) -> None:
        """Saves model and tokenizer (``save_pretrained``) and the corpus and queries as jsonl."""
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        with open(directory / "corpus.jsonl", "w") as f:
            for i, text in enumerate(self.world.documents):
                f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
        with open(directory / "queries.jsonl", "w") as f:
            for q in self.world.queries:
                f.write(json.dumps({"prompt": q["prompt"], "target": q["target"], "set": q["set"],
                                    "proponents": [f"doc{i}" for i in q["proponents"]]}) + "\n")
        log.info("facts: exported model, tokenizer and jsonl files to %s", directory)
