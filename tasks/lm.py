"""Causal language models as attribution problems: encoding, batches, loss, measurement.

Shared by ``facts`` (a model trained from scratch here) and ``hf_lm`` (any saved HF causal
LM). Batches are dicts ``{input_ids, attention_mask, labels}`` of ``[B, T]`` tensors, padded on
the right; ``labels`` is aligned with ``input_ids`` (shifted inside the loss) and ``IGNORE``
where a token is not predicted (padding, and a query's prompt).

* training loss of a document: its *summed* token NLL (what up-weighting it adds to the
  token-averaged objective, up to a constant);
* measurement of a query: log p(target tokens | prompt), summed over the target tokens;
* tail-patch step loss: the *mean* token NLL, the objective of one training step on the
  document alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from estimators.problem import (
    IGNORE,
    AttributionProblem,
    Checkpoint,
    TailPatch,
    adam_state,
    cross_entropy_sum,
    eval_mode,
    move_to,
    sample_categorical,
)
from tasks.base import Task

Encode = Callable[[str], list[int]]


class LMTask(Task):
    """What every language-model task shares: a tokenizer, and the training documents and
    queries encoded with it (``train_data``, ``query_data``: :class:`TokenDataset`)."""

    has_text = True
    tokenizer: Any
    train_data: TokenDataset
    query_data: TokenDataset

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def n_train(self) -> int:
        return len(self.train_data)


class TokenDataset(Dataset):
    """Encoded examples: each ``{input_ids [T], labels [T]}`` (labels IGNORE where unused)."""

    def __init__(self, examples: list[dict[str, Tensor]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.examples[i]


def encode_documents(texts: Sequence[str], encode: Encode, bos: int | None, eos: int | None,
                     max_length: int) -> TokenDataset:
    """Documents whose every token (after the first) is predicted."""
    out = []
    for text in texts:
        ids = ([bos] if bos is not None else []) + encode(text) + ([eos] if eos is not None else [])
        ids = torch.tensor(ids[:max_length])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return TokenDataset(out)


def encode_queries(prompts: Sequence[str], targets: Sequence[str], encode: Encode,
                   bos: int | None, max_length: int) -> TokenDataset:
    """Prompt + target, only the target tokens predicted.

    The target is tokenized in context (``prompt + " " + target``) when the tokenizer keeps the
    prompt's tokens as a prefix, else separately with a leading space.
    """
    out = []
    for prompt, target in zip(prompts, targets, strict=True):
        head = [bos] if bos is not None else []
        p = encode(prompt)
        sep = "" if prompt.endswith(" ") or target.startswith(" ") else " "
        full = encode(prompt + sep + target)
        t = full[len(p):] if full[:len(p)] == p and len(full) > len(p) else encode(sep + target)
        ids = torch.tensor((head + p + t)[-max_length:])
        labels = ids.clone()
        labels[: len(ids) - len(t)] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return TokenDataset(out)


def make_collate(pad_id: int) -> Callable[[list[dict]], dict[str, Tensor]]:
    """Pads on the right: ``{input_ids, attention_mask, labels}`` ``[B, T_max]``."""

    def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        length = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def lm_outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Next-token logits ``[B, T, V]``."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def summed_nll(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """``[B]``: summed NLL of the predicted tokens (labels shifted by one)."""
    return cross_entropy_sum(logits[:, :-1], batch["labels"][:, 1:])


def log_prob(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """``[B]``: log p(predicted tokens | context), e.g. log p(target | prompt)."""
    return -summed_nll(logits, batch)


def mean_nll(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Scalar: the token-averaged NLL of a batch (the training objective of one step)."""
    targets = batch["labels"][:, 1:]
    return summed_nll(logits, batch).sum() / (targets != IGNORE).sum().clamp_min(1)


def step_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The loss of one training step on ``batch``: its mean token NLL (scalar)."""
    return mean_nll(lm_outputs(model, batch), batch)


def sample_labels(logits: Tensor, batch: dict[str, Tensor], generator: torch.Generator) -> dict:
    """The batch with its predicted tokens drawn from the model (true Fisher)."""
    labels = batch["labels"].clone()
    labels[:, 1:] = sample_categorical(logits[:, :-1], batch["labels"][:, 1:], generator)
    return {**batch, "labels": labels}


@torch.no_grad()
def exact_match(model: nn.Module, data: Dataset, collate, batch_size: int = 128,
                device: str | torch.device = "cpu") -> Tensor:
    """``[n]`` bool: every target token is the greedy (argmax) next token."""
    out = []
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            batch = move_to(collate([data[i] for i in range(start, min(start + batch_size,
                                                                         len(data)))]), device)
            pred = lm_outputs(model, batch)[:, :-1].argmax(-1)
            targets = batch["labels"][:, 1:]
            out.append(((pred == targets) | (targets == IGNORE)).all(1).cpu())
    return torch.cat(out)


def tail_patch_spec(model: nn.Module, checkpoints: list[Checkpoint], lr: float) -> TailPatch:
    """The tail-patch step of an LM: ``lr``, the final Adam state (or None: a plain gradient
    step) and the step loss (mean token NLL)."""
    opt = checkpoints[-1].optimizer_state if checkpoints else None
    return TailPatch(lr=float(lr), step_loss=step_loss, adam=adam_state(model, opt))


def lm_problem(model: nn.Module, checkpoints: list[Checkpoint], train: TokenDataset,
               queries: TokenDataset, pad_id: int, **fields) -> AttributionProblem:
    """An :class:`AttributionProblem` of a causal LM (``fields``: texts, capabilities)."""
    return AttributionProblem(
        model=model, train=train, queries=queries, collate_fn=make_collate(pad_id),
        outputs=lm_outputs, loss=summed_nll, measure=log_prob, sample_targets=sample_labels,
        l2=0.0, checkpoints=checkpoints, **fields,
    )


class LMModule(L.LightningModule):
    """Trains a causal LM on the token-averaged NLL with AdamW.

    Learning rate: linear warmup over ``warmup`` of the steps, then cosine decay to
    ``final_lr_ratio`` of the peak ``lr``.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple,
                 warmup: float, final_lr_ratio: float, total_steps: int):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup, self.final_lr_ratio, self.total_steps = warmup, final_lr_ratio, total_steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return step_loss(self.model, batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=self.betas,
                                      weight_decay=self.weight_decay)
        warm = max(1, int(self.warmup * self.total_steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
            cosine = 0.5 * (1 + math.cos(math.pi * progress))
            return self.final_lr_ratio + (1 - self.final_lr_ratio) * cosine

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule,
                                                         "interval": "step"}}
