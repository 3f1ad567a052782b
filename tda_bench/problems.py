"""Attribution problems for the common cases, in one call each.

* :func:`classification_problem`: a classifier ``model(x) -> logits [B, C]`` and ``(x, y)``
  data; the training loss is the per-example cross entropy, the measurement the margin
  ``logit_y − logsumexp_{c≠y} logit_c`` (the digits tasks' measurement), and the true
  Fisher samples labels from the model.
* :func:`causal_lm_problem`: a Hugging Face causal LM, its tokenizer, documents and
  ``(prompt, target)`` queries; the loss of a document is its summed token NLL, the
  measurement log p(target | prompt) (the ``facts`` and ``hf_lm`` tasks' contract).

Both return an :class:`~estimators.problem.AttributionProblem`; any other field of it
(``checkpoints``, ``key``, ``model_factory``, ``flipped_labels``, ...) passes through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from estimators.problem import AttributionProblem
from tasks import lm
from tasks.digits import logits_of, margin, per_example_ce, sample_labels


def _model_dtype(model: nn.Module) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.get_default_dtype()


def _dataset(name: str, data: Any, model: nn.Module) -> Dataset:
    """``data`` as a dataset of ``(x, y)``: a dataset is kept, a pair of tensors (or arrays)
    becomes a :class:`TensorDataset` with floating ``x`` in the model's dtype."""
    if isinstance(data, Dataset):
        return data
    if not (isinstance(data, Sequence) and len(data) == 2):
        raise ValueError(f"{name} must be a Dataset of (x, y) pairs or a pair (x, y) of "
                         f"tensors, got {type(data).__name__}.")
    x, y = (torch.as_tensor(v) for v in data)
    if x.shape[:1] != y.shape[:1] or y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"{name} must pair x [N, ...] with integer labels y [N], got x of "
                         f"shape {tuple(x.shape)} and y of shape {tuple(y.shape)}, dtype "
                         f"{y.dtype}.")
    if x.is_floating_point():
        x = x.to(_model_dtype(model))
    return TensorDataset(x, y.long())


def classification_problem(model: nn.Module, train: Any, queries: Any, *, l2: float,
                           collate_fn=None, **fields: Any) -> AttributionProblem:
    """The attribution problem of a trained classifier (see the module docstring).

    Args:
        model: the trained classifier, ``model(x) -> logits [B, C]``.
        train: the training set: a dataset of ``(x, y)`` pairs, or a pair of tensors
            ``(x [N, ...], y [N])``.
        queries: the examples to attribute, in the same form.
        l2: λ₂ of the training objective mean(CE) + (λ₂/2)‖θ‖² (SGD's or Adam's
            ``weight_decay``; 0.0 when there is none). Required: it enters every curvature
            as λ₂I, and a wrong value silently changes what influence means.
        collate_fn: the batches' collate function (None: PyTorch's default).
        **fields: any other :class:`AttributionProblem` field (``checkpoints``, ``key``,
            ``model_factory``, ``flipped_labels``, ...).

    Returns:
        the problem: scores are ``[len(queries), len(train)]``.
    """
    try:
        l2 = float(l2)
    except (TypeError, ValueError):
        raise ValueError(f"l2 must be a number (0.0 for no L2 term), got {l2!r}.") from None
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0 (0.0 for no L2 term), got {l2!r}.")
    return AttributionProblem(
        model=model, train=_dataset("train", train, model),
        queries=_dataset("queries", queries, model), collate_fn=collate_fn,
        outputs=logits_of, loss=per_example_ce, measure=margin, sample_targets=sample_labels,
        l2=l2, **fields)


def _query_pair(query: Any, i: int) -> tuple[str, str]:
    if isinstance(query, Mapping) and {"prompt", "target"} <= set(query):
        return str(query["prompt"]), str(query["target"])
    if isinstance(query, Sequence) and not isinstance(query, str) and len(query) == 2:
        return str(query[0]), str(query[1])
    raise ValueError(f"queries[{i}] must be a (prompt, target) pair or a dict with 'prompt' "
                     f"and 'target', got {query!r}.")


def causal_lm_problem(model: nn.Module, tokenizer: Any, docs: Sequence[str],
                      queries: Sequence[Any], *, max_length: int = 256,
                      proponents: Sequence[Sequence[int]] | None = None,
                      **fields: Any) -> AttributionProblem:
    """The attribution problem of a causal language model (see the module docstring).

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=).logits``
            (``[B, T, V]``), e.g. a ``transformers`` ``AutoModelForCausalLM``.
        tokenizer: its tokenizer (``tokenizer(text, add_special_tokens=False)["input_ids"]``;
            ``bos``/``eos``/``pad`` token ids where it has them).
        docs: the training documents, one string each; every token is predicted.
        queries: ``(prompt, target)`` pairs (or dicts with ``prompt`` and ``target``); only
            the target's tokens are measured.
        max_length: tokens kept per document or query.
        proponents: optional, per query the indices of the documents that state its fact
            (fact tracing: ``tda_bench.metrics.mrr``, ``recall``).
        **fields: any other :class:`AttributionProblem` field (``checkpoints``, ``l2``,
            ``key``, ``query_groups``, ``tail_patch``, ...).

    Returns:
        the problem: scores are ``[len(queries), len(docs)]``; its texts feed ``bm25``.
    """
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise ValueError("docs must be a sequence of strings, one per training document.")
    pairs = [_query_pair(q, i) for i, q in enumerate(queries)]
    if proponents is not None:
        if len(proponents) != len(pairs):
            raise ValueError(f"proponents must hold one list per query ({len(pairs)}), got "
                             f"{len(proponents)}.")
        bad = sorted({int(p) for props in proponents for p in props
                      if not 0 <= int(p) < len(docs)})
        if bad:
            raise ValueError(f"proponents name documents {bad[:5]} outside docs "
                             f"(0..{len(docs) - 1}).")
        fields["proponents"] = [list(map(int, p)) for p in proponents]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos or 0)
    train = lm.encode_documents(list(docs), encode, bos, eos, int(max_length))
    query_data = lm.encode_queries([p for p, _ in pairs], [t for _, t in pairs], encode, bos,
                                   int(max_length))
    l2 = fields.pop("l2", 0.0)
    problem = lm.lm_problem(model, fields.pop("checkpoints", []), train, query_data, pad,
                            train_text=list(docs), query_text=[f"{p} {t}" for p, t in pairs],
                            **fields)
    return dataclasses.replace(problem, l2=float(l2)) if l2 else problem


__all__ = ["classification_problem", "causal_lm_problem"]

