"""``hf_lm``: fact tracing for any saved HF causal LM and a user's corpus and queries.

* ``model``: a local directory with a causal LM and its tokenizer (``save_pretrained``), or
  a hub id (for users with network access);
* ``corpus``: a jsonl file, one training document per line: ``{"id": ..., "text": ...}``;
* ``queries``: a jsonl file, one query per line: ``{"prompt": ..., "target": ...}`` with
  optional ``proponents`` (a list of corpus ids: the documents that state the fact) and
  ``set`` (``forward`` by default; e.g. ``flipped`` for a second query set).

The model is not trained here: :meth:`HFLM.fit` returns its weights as the final
checkpoint, and it is identified by content (:meth:`HFLM.identity`: hashes of its config and
weight files, and of the encoded documents), so replacing the files at the same path
changes every cache key. Estimators attribute through the linear layers of the transformer
blocks by default (``problem.modules = "blocks"``: embeddings and lm_head left out, as
Grosse et al. 2023); ``estimator.modules=all`` adds the lm_head.

Measurement: log p(target | prompt); training loss: a document's summed token
NLL (:mod:`tasks.lm`). Queries with proponents give the fact-tracing metrics; tail-patch
takes a plain gradient step of ``tail_patch_lr`` (no optimizer state is known) when set.
"""

from __future__ import annotations

import hashlib
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


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json",
           "*.bin.index.json")
CHUNK = 1 << 20  # bytes read at a time while hashing


def model_files(directory: Path) -> list[Path]:
    """A saved model's ``config.json`` and weight files (the tokenizer enters through the
    encoded data)."""
    files = {p for pattern in WEIGHTS for p in directory.glob(pattern) if p.is_file()}
    config = directory / "config.json"
    if not files:
        raise FileNotFoundError(f"{directory} holds no weight files ({', '.join(WEIGHTS)}); "
                                "give task.model a directory written by save_pretrained.")
    return sorted(files | ({config} if config.is_file() else set()))


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (never whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


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
    trains = False  # loaded from its files every run; keyed by their content (identity)

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

    def model_directory(self) -> Path:
        """The directory of the model's files: ``task.model``, or a hub id's local snapshot."""
        path = Path(self.model_name)
        if path.is_dir():
            return path
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.model_name, local_files_only=True))

    def identity(self) -> dict:
        """The model and data by content: streamed SHA-256 of the model's config and weight
        files (:func:`model_files`), the dtype, and a hash of the encoded documents."""
        if getattr(self, "_identity", None) is None:
            directory = self.model_directory()
            files = {p.relative_to(directory).as_posix(): file_digest(p)
                     for p in model_files(directory)}
            documents = hashlib.sha256()
            for example in self.train_data.examples:
                ids = example["input_ids"].to(torch.int64).numpy()
                documents.update(len(ids).to_bytes(8, "little") + ids.tobytes())
            self._identity = {"files": files, "dtype": str(self.dtype),
                              "documents": documents.hexdigest()}
        return self._identity

    def fit(self, model: nn.Module, seed: int, indices: Tensor | None = None,
            progress: bool = False) -> list[Checkpoint]:
        """No training: the given weights (the model's own tensors, not a copy) are the final
        and only checkpoint."""
        if indices is not None:
            raise ValueError("hf_lm cannot retrain its model on subsets; it has no LDS/LOO.")
        return [Checkpoint(model.state_dict(), lr=0.0, step=0, optimizer_state=None)]

    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        sets: dict[str, list[int]] = {}
        for i, q in enumerate(self.queries):
            sets.setdefault(str(q.get("set", "forward")), []).append(i)
        fields: dict = {"query_groups": sets, "modules": "blocks"}
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
