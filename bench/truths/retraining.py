"""Retraining shared by the ground truths that retrain (LOO, LDS, counterfactual removal).

Every retrained model uses the task's own :meth:`~tasks.base.Task.fit`, so it shares every
hyperparameter with the attributed model; its seed is ``RETRAIN_SEED_BASE + k``, never an
attributed model's seed.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from tasks.base import Task

log = logging.getLogger(__name__)

RETRAIN_SEED_BASE = 10_000  # retraining seeds never coincide with attributed-model seeds


def check_retrainable(task: Task, where: str) -> None:
    """Refuses a retraining ground truth (``where``: its config key) on a task whose model
    is given rather than trained."""
    if not task.retrainable:
        raise ValueError(f"{type(task).__name__} does not train its model, so it cannot "
                         f"retrain it on subsets; set {where}=null.")


def fit_and_measure(task: Task, jobs: list[tuple[int, torch.Tensor]], vectorise: bool,
                    desc: str) -> list[torch.Tensor]:
    """The query measurements ``[n_queries]`` of a model retrained for each job.

    A job is (retraining seed, kept training indices). Jobs that keep equally many examples
    train together by :meth:`~tasks.base.Task.fit_many` where the task supports it and
    ``vectorise`` is on; the rest are fitted one by one with ``task.fit``. Either way the
    models are the same up to float rounding.
    """
    values: list[torch.Tensor | None] = [None] * len(jobs)
    if vectorise:
        for size in sorted({len(kept) for _, kept in jobs}, reverse=True):
            group = [i for i, (_, kept) in enumerate(jobs) if len(kept) == size]
            out = task.fit_many([jobs[i][0] for i in group], [jobs[i][1] for i in group])
            if out is None:  # the task cannot vectorise
                break
            for i, row in zip(group, out, strict=True):
                values[i] = row
    todo = [i for i, v in enumerate(values) if v is None]
    if len(todo) > 1:
        log.info("%s: retraining %d models one by one (%s).", desc, len(todo),
                 "the task does not vectorise" if vectorise else "ground_truth.vectorise=false")
    for i in tqdm(todo, desc=desc, disable=None):
        values[i] = fit_one(task, *jobs[i])
    return values


def fit_one(task: Task, seed: int, kept: torch.Tensor, init: dict | None = None) -> torch.Tensor:
    """f ``[n_queries]`` of one model trained from ``seed`` (or warm-started from the state
    ``init``) on the ``kept`` examples."""
    model = task.build_model(seed)
    if init is not None:
        model.load_state_dict(init)
    task.fit(model, seed=seed, indices=kept)
    return task.measure_queries(model)


def stacked(values: list[torch.Tensor]) -> torch.Tensor:
    """``[U, n_queries]`` (empty for no units)."""
    return torch.stack(values) if values else torch.zeros(0)
