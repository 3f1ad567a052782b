"""``hf_lm``: fact tracing for any saved HF causal LM and a user's corpus and queries.

* ``model``: a local directory with a causal LM and its tokenizer (``save_pretrained``), or
  a hub id (for users with network access);
* ``corpus``: a jsonl file, one training document per line: ``{"id": ..., "text": ...}``;
* ``queries``: a jsonl file, one query per line: ``{"prompt": ..., "target": ...}`` with
  optional ``proponents`` (a list of corpus ids: the documents that state the fact) and
  ``set`` (``forward`` by default; e.g. ``flipped`` for a second query set).

The model is not trained here: :meth:`HFLM.fit` returns its weights as the final
checkpoint. Measurement: log p(target | prompt); training loss: a document's summed token
NLL (:mod:`tasks.lm`). Queries with proponents give the fact-tracing metrics; tail-patch
takes a plain gradient step of ``tail_patch_lr`` (no optimizer state is known) when set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from estimators.problem import AttributionProblem, Checkpoint
from tasks import lm


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """The records of a jsonl file, each checked for the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a jsonl file with fields "
                                f"{', '.join(required)}.")
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in required if k not in record]
            if missing:
                raise ValueError(f"{path}:{line_no} lacks the field(s) {missing}; every line "
                                 f"needs {', '.join(required)}.")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records.")
    return records


class HFLM(lm.LMTask):
    """A saved causal LM with a jsonl corpus and queries (see module docstring).

    Args:
        model: a local model directory or a hub id.
        corpus: path of ``corpus.jsonl`` (``id``, ``text``).
        queries: path of ``queries.jsonl`` (``prompt``, ``target``, optional ``proponents``,
            ``set``).
        max_length: tokens per document or query (longer ones are cut).
        dtype: the model's dtype (``float32``, ``float64``, ``bfloat16``).
        tail_patch_lr: learning rate of the tail-patch step (None: no tail-patch).
        **task: ``split_seed`` (unused: the data are given), ``lds``/``loo`` (must be null),
            ``device``.
    """

    VERSION = 1
    retrainable = False  # the model is given, not trained here

    def __init__(self, model: str, corpus: str, queries: str, max_length: int = 256,
                 dtype: str = "float32", tail_patch_lr: float | None = None, **task):
        super().__init__(**task)
        if dtype not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"task.dtype must be float32, float64 or bfloat16, got {dtype!r}")
        from transformers import AutoTokenizer

        self.model_name, self.dtype = model, getattr(torch, dtype)
        self.max_length, self.tail_patch_lr = int(max_length), tail_patch_lr
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        docs = read_jsonl(corpus, ("id", "text"))
        self.texts = [str(d["text"]) for d in docs]
        position = {str(d["id"]): i for i, d in enumerate(docs)}
        if len(position) != len(docs):
            raise ValueError(f"{corpus} has duplicate document ids; make every id unique.")
        self.queries = read_jsonl(queries, ("prompt", "target"))
        self.proponents = []
        for q in self.queries:
            unknown = [p for p in q.get("proponents", []) if str(p) not in position]
            if unknown:
                raise ValueError(f"query {q['prompt']!r} names proponents {unknown[:5]} that are "
                                 f"not ids in {corpus}.")
            self.proponents.append([position[str(p)] for p in q.get("proponents", [])])
        bos = self.tokenizer.bos_token_id
        eos = self.tokenizer.eos_token_id
        self.train_data = lm.encode_documents(self.texts, self._encode, bos, eos, self.max_length)
        self.query_data = lm.encode_queries([q["prompt"] for q in self.queries],
                                            [q["target"] for q in self.queries], self._encode,
                                            bos, self.max_length)

    def build_model(self, seed: int) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=self.dtype)
        return model.to(self.device).eval()

    def fit(self, model: nn.Module, seed: int, indices: Tensor | None = None,
            progress: bool = False) -> list[Checkpoint]:
        """No training: the given weights are the final (and only) checkpoint."""
        if indices is not None:
            raise ValueError("hf_lm cannot retrain its model on subsets; it has no LDS/LOO.")
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return [Checkpoint(state, lr=0.0, step=0, optimizer_state=None)]

    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        sets: dict[str, list[int]] = {}
        for i, q in enumerate(self.queries):
            sets.setdefault(str(q.get("set", "forward")), []).append(i)
        fields: dict = {"query_groups": sets}
        if any(self.proponents):
            fields["proponents"] = self.proponents
        if self.tail_patch_lr is not None:
            fields["tail_patch"] = lm.tail_patch_spec(model, checkpoints, self.tail_patch_lr)
        correct = lm.exact_match(model, self.query_data, lm.make_collate(self.pad_id),
                                 device=next(model.parameters()).device)
        fields["task_metrics"] = {"query_accuracy": float(correct.float().mean())}
        texts = [q["prompt"] + " " + q["target"] for q in self.queries]
        return lm.lm_problem(model, checkpoints, self.train_data, self.query_data, self.pad_id,
                             train_text=self.texts, query_text=texts, **fields)
