"""``hf_lm``: fact tracing for any saved HF causal LM and a user's corpus and queries.

* ``model``: a local directory with a causal LM and its tokenizer (``save_pretrained``), or
  a hub id (for users with network access);
* ``corpus``: a jsonl file, one training document per line: ``{"id": ..., "text": ...}``;
* ``queries``: a jsonl file, one query per line: ``{"prompt": ..., "target": ...}`` with
  optional ``proponents`` (a list of corpus ids: the documents that state the fact) and
  ``set`` (``forward`` by default; e.g. ``flipped`` for a second query set).

Inputs are checked before anything is loaded or computed, each error naming the file and
line (or the argument): JSON syntax, the type of every field, empty or blank texts, prompts
and targets, duplicate document ids, proponents that are not corpus ids, a local model
path that does not exist (said as such, not tried as a hub id).

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
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from estimators.options import OptionError, choice, escape, literal, positive
from estimators.problem import AttributionProblem, Checkpoint
from tasks import lm

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # org/name, as on the hub
# The fields of each file: name -> (required, accepted types, what the value must be).
CORPUS_FIELDS = {"id": (True, (str, int), "a string or an integer"),
                 "text": (True, (str,), "a non-empty string")}
QUERY_FIELDS = {"prompt": (True, (str,), "a non-empty string"),
                "target": (True, (str,), "a non-empty string"),
                "proponents": (False, (list,), "a list of corpus ids, e.g. [\"d1\", \"d7\"]"),
                "set": (False, (str,), "a string such as forward or flipped")}


def read_jsonl(path: str | Path, fields: dict[str, tuple], arg: str) -> list[tuple[int, dict]]:
    """The records of a jsonl file with their line numbers, each checked against ``fields``.

    Every error names ``path:line``: a line that is not JSON, a record that is not an
    object, a missing field, a value of the wrong type, an empty or blank string.

    Args:
        fields: ``{name: (required, types, description)}``.
        arg: the task argument that names the file (``corpus``), for the message.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise OptionError(f"{{{arg}}}={escape(path)} {what}; give a jsonl file, one JSON object "
                          f"a line with the fields {', '.join(fields)}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{escape(path)}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise OptionError(f"{where}: not valid JSON ({escape(err.msg)} at column "
                                  f"{err.colno}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise OptionError(f"{where}: expected a JSON object with the fields "
                                  f"{', '.join(fields)}, got {escape(type(record).__name__)}")
            for name, (required, types, description) in fields.items():
                if name not in record:
                    if required:
                        raise OptionError(f"{where} lacks the field {name!r}; every line needs "
                                          f"{', '.join(k for k, f in fields.items() if f[0])}")
                    continue
                value = record[name]
                blank = isinstance(value, str) and not value.strip() and name != "id"
                if isinstance(value, bool) or not isinstance(value, types) or blank:
                    raise OptionError(f"{where}: {name!r} must be {description}, got "
                                      f"{literal(value)}")
            records.append((line_no, record))
    if not records:
        raise OptionError(f"{{{arg}}}={escape(path)} holds no records")
    return records


def check_model(model: str) -> str:
    """``model`` if it is a local directory, or could be a hub id; a path that does not
    exist is said to be one (not passed on to the hub as an id)."""
    if not isinstance(model, str) or not model.strip():
        raise OptionError(f"{{model}} must be a model directory or a hub id, got "
                          f"{literal(model)}")
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise OptionError(f"{{model}}={escape(model)} is a file; give the directory that "
                          "save_pretrained wrote (model and tokenizer)")
    if model.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(model):
        raise OptionError(f"{{model}}={escape(model)}: no such directory; give the directory "
                          "that save_pretrained wrote (model and tokenizer), or a hub id "
                          "such as org/name")
    return model


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
        self.model_name = check_model(model)
        self.dtype = getattr(torch, choice("dtype", dtype, ("float32", "float64", "bfloat16")))
        self.max_length = positive("max_length", max_length, integer=True)
        self.tail_patch_lr = positive("tail_patch_lr", tail_patch_lr, allow_none=True)
        docs = read_jsonl(corpus, CORPUS_FIELDS, "corpus")
        queries_read = read_jsonl(queries, QUERY_FIELDS, "queries")
        self.texts = [d["text"] for _, d in docs]
        position: dict[str, int] = {}
        for i, (line_no, d) in enumerate(docs):
            if str(d["id"]) in position:
                raise OptionError(f"{escape(corpus)}:{line_no}: the id {literal(d['id'])} is "
                                  "already used by another document; make every id unique")
            position[str(d["id"])] = i
        self.queries = [q for _, q in queries_read]
        self.proponents = []
        for line_no, q in queries_read:
            ids = q.get("proponents", [])
            unknown = [p for p in ids if isinstance(p, bool) or not isinstance(p, str | int)
                       or str(p) not in position]
            if unknown:
                raise OptionError(f"{escape(queries)}:{line_no}: proponents "
                                  f"{literal(unknown[:5])} are not ids of {escape(corpus)}")
            self.proponents.append([position[str(p)] for p in ids])
        self.tokenizer = self._load_tokenizer()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        bos = self.tokenizer.bos_token_id
        eos = self.tokenizer.eos_token_id
        self.train_data = lm.encode_documents(self.texts, self._encode, bos, eos, self.max_length)
        self.query_data = lm.encode_queries([q["prompt"] for q in self.queries],
                                            [q["target"] for q in self.queries], self._encode,
                                            bos, self.max_length)
        empty = [i for i, x in enumerate(self.query_data) if not (x["labels"] != lm.IGNORE).any()]
        if empty:
            raise OptionError(f"queries {empty[:5]} of {escape(queries)} have no target token "
                              f"left within {{max_length}}={self.max_length}; raise it or "
                              "shorten their prompts")

    def _load_tokenizer(self):
        """The model's tokenizer; a directory without one, or an id the hub does not know
        (or cannot be reached), is one sentence naming ``model``."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_name)
        except (OSError, ValueError) as err:
            if Path(self.model_name).is_dir():
                raise OptionError(f"{{model}}={escape(self.model_name)} holds no tokenizer that "
                                  "AutoTokenizer can load; save the tokenizer there too "
                                  "(tokenizer.save_pretrained)") from None
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            raise OptionError(f"{{model}}={escape(self.model_name)} is not a local directory, "
                              f"and the hub does not have it or cannot be reached "
                              f"({escape(first)}); give a directory saved with save_pretrained"
                              ) from None

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
