"""Ground truth for your own model: LDS and LOO from your own training function.

``train_fn(indices, seed) -> model`` is your training routine: it trains a fresh model on
the training examples ``indices`` (a ``[n]`` long tensor of positions in ``problem.train``)
from ``seed`` and returns it. :func:`lds` and :func:`loo` hand it to the harness's own
ground-truth kinds (:mod:`bench.truths.lds`, :mod:`bench.truths.loo`) through a small task
adapter, so the subsets, the retraining seeds (``10_000 + k``), the shards, the locks and
the verified cache are exactly those of ``tda-bench`` (:mod:`bench.ground_truth`); only the
models come from your function. LOO warm-starts every retraining from the full-data optimum
when ``train_fn`` takes a third argument ``init`` (None or a state dict to start from).

The cache (``cache_dir``; None: a temporary directory, nothing kept) is keyed by the
training and query data, the source code of ``train_fn`` and of the problem's ``outputs``
and ``measure``, the kind's settings and ``key``: change ``key`` when anything else your
training depends on changes (a hyperparameter read from outside ``train_fn``, a helper it
calls), or the cache returns the old models' numbers.

Shards: ``options=Options(num_shards=S)`` splits the retraining into S shard files;
processes that call :func:`lds` on the same ``cache_dir`` share the missing shards (each
takes those no other holds), or :func:`shard` computes one shard, e.g. one job each.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench import ground_truth as driver
from bench.cache import content_hash
from bench.ground_truth import GroundTruthMissing
from bench.ground_truth import GroundTruthOptions as Options
from bench.truths import GroundTruth, TruthContext, truth_kinds
from estimators.problem import AttributionProblem, Checkpoint
from tasks.base import Task

TrainFn = Callable[..., nn.Module]  # (indices [n], seed[, init]) -> the trained model


class _Retrained(nn.Module):
    """What the retraining code builds, may warm-start, fits and measures: the slot of the
    model ``train_fn`` returns, and the state it was asked to start from."""

    def __init__(self):
        super().__init__()
        self.init: dict[str, Tensor] | None = None
        self.trained: nn.Module | None = None

    def state_dict(self, *args, **kwargs):
        return self.trained.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.init = dict(state_dict)


class FunctionTask(Task):
    """A :class:`~tasks.base.Task` made of a problem and a training function: what the
    retraining ground truths call (``build_model``, ``fit``, ``measure_queries``).

    Args:
        train_fn: see the module docstring.
        problem: the training set, the queries and the measurement (its model is not used).
    """

    VERSION = 1
    convex = True  # LOO is the caller's choice; it means something for convex objectives

    def __init__(self, train_fn: TrainFn, problem: AttributionProblem):
        if not callable(train_fn):
            raise ValueError(f"train_fn must be a function (indices, seed) -> trained model, "
                             f"got {type(train_fn).__name__}.")
        super().__init__(device=str(problem.device))
        self.train_fn, self.base = train_fn, problem
        try:
            self.warm_start = "init" in inspect.signature(train_fn).parameters
        except (TypeError, ValueError):
            self.warm_start = False

    @property
    def n_train(self) -> int:
        return self.base.n_train

    def build_model(self, seed: int) -> nn.Module:
        return _Retrained()

    def fit(self, model: nn.Module, seed: int, indices: Tensor | None = None,
            progress: bool = False) -> list[Checkpoint]:
        kept = torch.arange(self.n_train) if indices is None else indices
        extra = {"init": model.init} if self.warm_start else {}
        trained = self.train_fn(kept, int(seed), **extra)
        if not isinstance(trained, nn.Module):
            raise ValueError(f"train_fn must return the trained nn.Module, got "
                             f"{type(trained).__name__}.")
        model.trained = trained
        return []

    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        return dataclasses.replace(self.base, model=model, checkpoints=checkpoints)

    def measure_queries(self, model: nn.Module, batch_size: int = 256) -> Tensor:
        return super().measure_queries(model.trained, batch_size)


def _code(fn: Any) -> Any:
    """The function (or class, for a callable object) whose code ``fn`` runs."""
    target = getattr(fn, "func", fn)  # functools.partial: its function
    return target if inspect.isroutine(target) or inspect.isclass(target) else type(target)


def _source(fn: Any) -> str:
    """The source code of ``fn`` (its qualified name where there is none)."""
    code = _code(fn)
    try:
        return inspect.getsource(code)
    except (OSError, TypeError):
        return f"{getattr(code, '__module__', '')}.{getattr(code, '__qualname__', code)}"


def identity(train_fn: TrainFn, problem: AttributionProblem, key: str) -> dict[str, Any]:
    """What determines the retrained models' measurements, as the kinds' task config: the
    data (every collated batch), the code of ``train_fn`` and of the measurement, ``key``."""
    data = {which: content_hash([batch for batch in problem.loader(which, 256)])
            for which in ("train", "queries")}
    return {"data": data, "train_fn": _source(train_fn),
            "measure": [_source(problem.outputs), _source(problem.measure)], "key": str(key)}


def _kind(name: str, settings: dict[str, Any]) -> GroundTruth:
    """The ground-truth kind ``name`` with ``settings``, errors in this API's terms."""
    kinds = truth_kinds()
    cls = kinds.get(name)
    if cls is None or cls.needs != "task" or not cls.sharded:
        usable = sorted(n for n, k in kinds.items() if k.needs == "task" and k.sharded)
        raise ValueError(f"kind must be a retraining ground truth ({', '.join(usable)}), got "
                         f"{name!r}.")
    unknown = sorted(set(settings) - set(cls.defaults))
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(unknown)}; its settings are "
                         f"{', '.join(f'{k}={v!r}' for k, v in cls.defaults.items())}.")
    try:
        return cls(**settings)
    except ValueError as error:  # the kind names its CLI key (task.lds.x); here it is x
        raise ValueError(str(error).replace(f"{cls.where()}.", "")) from None


def context(train_fn: TrainFn, problem: AttributionProblem, cache_dir: str | Path,
            key: str = "", options: Options | None = None) -> TruthContext:
    """The :class:`~bench.truths.TruthContext` the kinds plan and compute in; its cache
    folder is ``<cache_dir>/ground_truth/<train_fn's name>/``."""
    task = FunctionTask(train_fn, problem)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", _code(train_fn).__name__).strip("_")
    return TruthContext(task, name or "train_fn", identity(train_fn, problem, key),
                        Path(cache_dir), options or Options())


def truth(kind: str, train_fn: TrainFn, problem: AttributionProblem, *,
          cache_dir: str | Path | None = None, key: str = "", options: Options | None = None,
          **settings: Any) -> dict[str, Tensor]:
    """The assembled ground truth of the retraining kind ``kind`` (``lds``, ``loo``, or a
    plug-in's), from the cache or computed (see the module docstring and :func:`lds`)."""
    gt = _kind(kind, settings)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="tda-bench-") as tmp:
            return truth(kind, train_fn, problem, cache_dir=tmp, key=key, options=options,
                         **settings)
    ctx = context(train_fn, problem, cache_dir, key, options)
    gt.check(ctx.task)
    try:
        return gt.load(ctx)
    except GroundTruthMissing:
        plan = gt.plan(ctx)
        num_shards = driver.started_split(plan, ctx.cache_dir, ctx.options.num_shards)
        missing = driver.missing_shards(plan, ctx.cache_dir, num_shards)
        raise GroundTruthMissing(
            f"{kind} ground truth is missing shards {missing} of {num_shards} in "
            f"{plan.directory(ctx.cache_dir)}; compute each with tda_bench.ground_truth.shard("
            f"{kind!r}, train_fn, problem, shard=s, num_shards={num_shards}, cache_dir=...), "
            "or pass options=Options(on_missing='compute').") from None


def lds(train_fn: TrainFn, problem: AttributionProblem, *, cache_dir: str | Path | None = None,
        key: str = "", options: Options | None = None, **settings: Any) -> dict[str, Tensor]:
    """The LDS ground truth of your model (Park et al. 2023): ``subsets`` random subsets of
    a ``fraction`` of the training set (generator ``seed``), each retrained by ``train_fn``
    with ``seeds`` seeds, every query measured.

    Args:
        train_fn: ``(indices, seed) -> trained model`` (see the module docstring).
        problem: the training set, the queries and the measurement.
        cache_dir: the cache root (None: a temporary directory).
        key: anything else that determines the retrained models (part of the cache key).
        options: shards and threads (:class:`Options`; one thread by default, so any
            sharding gives the same numbers).
        **settings: ``subsets`` (50), ``fraction`` (0.5), ``seeds`` (1), ``seed`` (0): the
            keys and defaults of ``task.lds``.

    Returns:
        ``{masks [M, N], values [M, K, Q], outputs [M, Q]}``, the truth of
        ``tda_bench.metrics.lds``.
    """
    return truth("lds", train_fn, problem, cache_dir=cache_dir, key=key, options=options,
                 **settings)


def loo(train_fn: TrainFn, problem: AttributionProblem, *, cache_dir: str | Path | None = None,
        key: str = "", options: Options | None = None, **settings: Any) -> dict[str, Tensor]:
    """The leave-one-out ground truth of your model (Koh & Liang 2017): the full-data model
    and, for ``n`` training points drawn by generator ``seed``, the model retrained without
    each; meaningful for a convex objective trained to convergence.

    Args:
        train_fn: ``(indices, seed[, init]) -> trained model`` (see the module docstring).
        problem, cache_dir, key, options: as for :func:`lds`.
        **settings: ``n`` (50), ``seed`` (0): the keys and defaults of ``task.loo``.

    Returns:
        ``{indices [L], reference [Q], effects [L, Q]}`` with effects f(θ) − f(θ₋ₘ), the
        truth of ``tda_bench.metrics.loo``.
    """
    return truth("loo", train_fn, problem, cache_dir=cache_dir, key=key, options=options,
                 **settings)


def shard(kind: str, train_fn: TrainFn, problem: AttributionProblem, shard: int,
          num_shards: int, *, cache_dir: str | Path, key: str = "",
          **settings: Any) -> Path:
    """Computes (or finds) shard ``shard`` of a ``num_shards`` split of ``kind`` into
    ``cache_dir`` and returns its file; :func:`lds`/:func:`loo` with the same arguments then
    join the shards."""
    gt = _kind(kind, settings)
    try:
        options = Options(shard=int(shard), num_shards=int(num_shards))
    except ValueError as error:  # worded for the CLI (ground_truth.shard); here: shard
        raise ValueError(str(error).replace("ground_truth.", "")) from None
    ctx = context(train_fn, problem, cache_dir, key, options)
    gt.check(ctx.task)
    return gt.compute_shard(ctx, options.shard, options.num_shards)


__all__ = ["FunctionTask", "GroundTruthMissing", "Options", "context", "identity", "lds",
           "loo", "shard", "truth"]
