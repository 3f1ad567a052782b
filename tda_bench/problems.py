"""Attribution problems for the common cases, in one call each.

* :func:`classification_problem`: a classifier ``model(x) -> logits [B, C]`` (or one logit
  ``[B]``/``[B, 1]`` for two classes) and ``(x, y)`` data; the training loss is the
  per-example cross entropy, the measurement the margin ``logit_y − logsumexp_{c≠y}
  logit_c`` (the digits tasks' measurement; ``±logit`` for one logit), and the true Fisher
  samples labels from the model.
* :func:`regression_problem`: a regressor ``model(x) -> [B]`` or ``[B, D]`` and ``(x, y)``
  data; the loss is the squared error Σ_d (pred − y)², the measurement its negative (or the
  prediction itself), the true Fisher samples y ~ N(pred, ½) (the Gaussian whose negative
  log-likelihood is that loss).
* :func:`causal_lm_problem`: a Hugging Face causal LM, its tokenizer, documents and
  ``(prompt, target)`` queries; the loss of a document is its summed token NLL, the
  measurement log p(target | prompt) (the ``facts`` and ``hf_lm`` tasks' contract).

Each returns an :class:`~estimators.problem.AttributionProblem`; any other field of it
(``checkpoints``, ``key``, ``model_factory``, ``flipped_labels``, ...) passes through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from estimators.problem import AttributionProblem
from tasks import lm
from tasks.digits import logits_of, margin, per_example_ce, sample_labels

MEASURES = ("loss", "prediction")  # regression_problem's measurements


def _model_dtype(model: nn.Module) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.get_default_dtype()


def _dataset(name: str, data: Any, model: nn.Module, labels: bool = True) -> Dataset:
    """``data`` as a dataset of ``(x, y)``: a pair of tensors (or arrays) becomes a
    :class:`TensorDataset` with floating ``x`` in the model's dtype and ``y`` class indices
    (``labels``) or targets in the model's dtype; a dataset (anything with ``len`` and
    indexing, e.g. a list of pairs) is kept as it is."""
    pair = isinstance(data, tuple | list) and len(data) == 2 and all(
        isinstance(v, Tensor | np.ndarray) for v in data)
    if not pair:
        if isinstance(data, Dataset) or (hasattr(data, "__len__")
                                         and hasattr(data, "__getitem__")):
            return data
        raise ValueError(f"{name} must be a dataset of (x, y) pairs or a pair (x, y) of "
                         f"tensors, got {type(data).__name__}.")
    x, y = (torch.as_tensor(v) for v in data)
    integral = not y.is_floating_point() or bool((y == y.round()).all())
    if x.shape[:1] != y.shape[:1] or (labels and (y.dim() != 1 or not integral)):
        what = "integer class labels y [N]" if labels else "targets y [N] or [N, D]"
        raise ValueError(f"{name} must pair x [N, ...] with {what}, got x of shape "
                         f"{tuple(x.shape)} and y of shape {tuple(y.shape)}, dtype {y.dtype}.")
    if x.is_floating_point():
        x = x.to(_model_dtype(model))
    return TensorDataset(x, y.long() if labels else y.to(_model_dtype(model)))


def _l2(l2: Any) -> float:
    try:
        value = float(l2)
    except (TypeError, ValueError):
        raise ValueError(f"l2 must be a number (0.0 for no L2 term), got {l2!r}.") from None
    if not value >= 0:
        raise ValueError(f"l2 must be >= 0 (0.0 for no L2 term), got {l2!r}.")
    return value


def _one_logit(logits: Tensor) -> bool:
    return logits.dim() == 1 or logits.shape[-1] == 1


def class_loss(logits: Tensor, batch) -> Tensor:
    """``[B]``: cross entropy; with one logit z, softplus(−(2y − 1) z)."""
    if _one_logit(logits):
        sign = 2 * batch[1] - 1
        return nn.functional.softplus(-sign * logits.reshape(-1))
    return per_example_ce(logits, batch)


def class_margin(logits: Tensor, batch) -> Tensor:
    """``[B]``: the margin (see the module docstring); with one logit z, (2y − 1) z."""
    if _one_logit(logits):
        return (2 * batch[1] - 1) * logits.reshape(-1)
    return margin(logits, batch)


def sample_classes(logits: Tensor, batch, generator: torch.Generator):
    """The batch with labels drawn from the model (softmax, or sigmoid of one logit)."""
    if _one_logit(logits):
        p = torch.sigmoid(logits.detach().reshape(-1).double()).cpu()
        return (batch[0], torch.bernoulli(p, generator=generator).long().to(batch[1].device))
    return sample_labels(logits, batch, generator)


def squared_error(pred: Tensor, batch) -> Tensor:
    """``[B]``: Σ_d (pred − y)² per example."""
    n = batch[1].shape[0]
    return (pred.reshape(n, -1) - batch[1].reshape(n, -1)).pow(2).sum(1)


def negative_squared_error(pred: Tensor, batch) -> Tensor:
    """``[B]``: −Σ_d (pred − y)², higher is better."""
    return -squared_error(pred, batch)


def prediction(pred: Tensor, batch) -> Tensor:
    """``[B]``: the prediction of a single-output regressor."""
    return pred.reshape(-1)


def sample_gaussian(pred: Tensor, batch, generator: torch.Generator):
    """The batch with targets drawn from N(pred, ½), whose NLL is the squared error."""
    noise = torch.randn(pred.shape, generator=generator, dtype=torch.float64)
    y = pred.detach() + math.sqrt(0.5) * noise.to(pred.device, pred.dtype)
    return (batch[0], y.reshape(batch[1].shape))


def classification_problem(model: nn.Module, train: Any, queries: Any, *, l2: float,
                           collate_fn=None, **fields: Any) -> AttributionProblem:
    """The attribution problem of a trained classifier (see the module docstring).

    Args:
        model: the trained classifier, ``model(x) -> logits [B, C]`` (or ``[B]``/``[B, 1]``,
            one logit: two classes, labels 0 and 1).
        train: the training set: a dataset of ``(x, y)`` pairs, or a pair of tensors
            ``(x [N, ...], y [N])`` (integral float labels are accepted).
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
    return AttributionProblem(
        model=model, train=_dataset("train", train, model),
        queries=_dataset("queries", queries, model), collate_fn=collate_fn,
        outputs=logits_of, loss=class_loss, measure=class_margin, sample_targets=sample_classes,
        l2=_l2(l2), **fields)


def regression_problem(model: nn.Module, train: Any, queries: Any, *, l2: float,
                       measure: str = "loss", collate_fn=None,
                       **fields: Any) -> AttributionProblem:
    """The attribution problem of a trained regressor (see the module docstring).

    Args:
        model: the trained regressor, ``model(x) -> [B]`` or ``[B, D]``.
        train: the training set: a dataset of ``(x, y)`` pairs, or a pair of tensors
            ``(x [N, ...], y [N] or [N, D])``.
        queries: the examples to attribute, in the same form.
        l2: λ₂ of the training objective mean(Σ_d (pred − y)²) + (λ₂/2)‖θ‖² (for one
            output, torch's ``mse_loss`` plus the L2 term; 0.0 when there is none).
            Required, as for :func:`classification_problem`; an objective with ½(pred − y)²
            is the same objective with λ₂ doubled.
        measure: ``loss``: the query's negative squared error; ``prediction``: its
            prediction (single-output models).
        collate_fn, **fields: as for :func:`classification_problem`.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}.")
    return AttributionProblem(
        model=model, train=_dataset("train", train, model, labels=False),
        queries=_dataset("queries", queries, model, labels=False), collate_fn=collate_fn,
        outputs=logits_of, loss=squared_error,
        measure=negative_squared_error if measure == "loss" else prediction,
        sample_targets=sample_gaussian, l2=_l2(l2), **fields)


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
            ``key``, ``query_groups``, ``tail_patch``, ...). ``modules`` (the layers
            attributed through when an estimator leaves its own ``modules`` unset) defaults
            to ``"blocks"``, as the ``hf_lm`` task: the transformer blocks' linear layers,
            without the embedding and the lm_head (Grosse et al. 2023); ``modules=None``
            takes every linear layer.

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
    fields.setdefault("modules", "blocks")
    problem = lm.lm_problem(model, fields.pop("checkpoints", []), train, query_data, pad,
                            train_text=list(docs), query_text=[f"{p} {t}" for p, t in pairs],
                            **fields)
    return dataclasses.replace(problem, l2=float(l2)) if l2 else problem


__all__ = ["causal_lm_problem", "classification_problem", "regression_problem"]

