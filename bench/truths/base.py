"""The ground-truth plug-in seam: a kind plans units, computes them, assembles the result.

A ground-truth kind is one class, registered by name with :func:`register_truth`::

    @register_truth
    class LDS(GroundTruth):
        name = "lds"
        defaults = {"subsets": 50, ...}
        def plan(self, ctx): ...                  # -> Plan: key, units, meta
        def compute(self, ctx, plan, units, desc): ...   # -> {"values": [U, ...], ...}
        def assemble(self, ctx, plan, shards): ...       # -> the truth metrics read

The driver (:mod:`bench.ground_truth`) runs ``compute`` in shards, under locks, through the
verified cache; metrics (:mod:`bench.metrics`) name the kind whose assembled value they read
(``Metric.needs``). Nothing else is edited to add a kind.

Where a kind's settings live (``scope``): ``task`` kinds under the task config
(``task.<name>: {...}``, ``null`` disables it) — they are part of the task's identity and
shared by every seed and estimator (LOO, LDS) or, with ``needs = "model"``, by every estimator
of one attributed model (PBRF); ``run`` kinds under the top-level config block
``config_key`` (default: the name). What a kind depends on (``needs``): the task config
(``task``), the attributed model (``model``), or the estimator and its scores (``scores``:
computed after scoring, e.g. counterfactual removal, tail-patch, mislabel detection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from bench import ground_truth as driver
from bench.cache import content_hash
from estimators.base import Estimator
from estimators.options import OptionError, arguments_of
from estimators.problem import AttributionProblem
from tasks.base import Task

SCOPES = ("task", "run")
NEEDS = ("task", "model", "scores")
_KINDS: dict[str, type[GroundTruth]] = {}


@dataclass
class TruthContext:
    """What a ground-truth kind may read while it plans, computes and assembles.

    Attributes:
        task: the instantiated task.
        task_name: its config name (``digits_mlp``).
        task_cfg: the task's resolved config.
        cache_dir: the cache root.
        options: how shards are computed (:class:`bench.ground_truth.GroundTruthOptions`).
        overrides: the run's overrides a ground-truth job must repeat (for the command that
            computes missing shards).
        seed: the run's seed.
        problem: the attributed model's problem (``needs`` model and scores).
        estimator: the fitted estimator (``needs`` scores).
        scores: its scores ``[n_queries, n_train]`` (``needs`` scores).
    """

    task: Task
    task_name: str
    task_cfg: dict[str, Any]
    cache_dir: Path
    options: driver.GroundTruthOptions = field(default_factory=driver.GroundTruthOptions)
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    problem: AttributionProblem | None = None
    estimator: Estimator | None = None
    scores: Tensor | None = None

    def training_config(self) -> dict[str, Any]:
        """The task config without any ground truth's settings or the recorded checkpoints:
        what determines a model retrained on a subset."""
        return {k: v for k, v in without_truth_settings(self.task_cfg).items()
                if k != "checkpoints"}


class GroundTruth:
    """A ground-truth kind (see the module docstring).

    Class attributes:
        name: the registry name, the task config key (``task.<name>``) of ``task`` kinds,
            and the ``needs`` of the metrics that read it.
        scope: ``task`` or ``run`` (where the settings live).
        needs: ``task``, ``model`` or ``scores`` (what it depends on).
        config_key: the top-level config block of a ``run`` kind (default: ``name``).
        defaults: every setting with its default; other keys are refused.
        format: bump when the meaning of the kind's cache files changes (part of the key).
        sharded: whether the kind's units can run as ``stage=ground_truth`` jobs (False for
            a kind that computes nothing, or only in the run that needs it).

    Args:
        **settings: the kind's settings (validated against ``defaults`` on construction).
    """

    name: ClassVar[str]
    scope: ClassVar[str] = "task"
    needs: ClassVar[str] = "task"
    config_key: ClassVar[str | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    format: ClassVar[int] = 1
    sharded: ClassVar[bool] = True

    def __init__(self, **settings: Any):
        with arguments_of(type(self).__name__, self.where()):
            unknown = sorted(set(settings) - set(self.defaults))
            if unknown:
                named = ", ".join(f"{{{k}}}" for k in unknown)
                raise OptionError(f"unknown setting(s) {named}; the settings are "
                                  f"{', '.join(sorted(self.defaults))}")
            self.spec = {**self.defaults, **settings}
            self.validate()

    @classmethod
    def where(cls) -> str:
        """The config key of the kind's settings (``task.lds``, ``removal``)."""
        return f"task.{cls.name}" if cls.scope == "task" else (cls.config_key or cls.name)

    def validate(self) -> None:
        """Raises :class:`~estimators.options.OptionError` naming the setting (its bare name:
        construction adds the owner and the ``task.<name>`` or block prefix)."""

    def check(self, task: Task) -> None:
        """Raises ``ValueError`` when ``task`` cannot offer this ground truth."""

    def active(self, ctx: TruthContext) -> bool:
        """Whether this run computes the kind (e.g. only when the task has proponents)."""
        return True

    def identity(self, ctx: TruthContext, **more: Any) -> dict[str, Any]:
        """What determines the kind's numbers: the task's training config and class, the
        settings, the format (and ``more``); its :func:`content_hash` is the cache key."""
        return {"task": ctx.task_name, "config": ctx.training_config(),
                "class": type(ctx.task).__qualname__, "version": ctx.task.VERSION,
                "kind": self.name, "spec": self.spec, "format": self.format, **more}

    def plan(self, ctx: TruthContext) -> driver.Plan:
        """The units and cache key of this ground truth."""
        raise NotImplementedError(f"{type(self).__name__} has no units to plan; override "
                                  "plan/compute/assemble or load.")

    def compute(self, ctx: TruthContext, plan: driver.Plan, units: list[int],
                desc: str) -> dict[str, Tensor]:
        """One shard's payload: ``values [len(units), ...]`` and any other tensors."""
        raise NotImplementedError(f"{type(self).__name__} computes no units.")

    def assemble(self, ctx: TruthContext, plan: driver.Plan, shards: driver.Shards) -> dict:
        """The truth the metrics read, from the joined shards. Default: ``values``."""
        return {"values": shards.values}

    def work(self, ctx: TruthContext, plan: driver.Plan) -> driver.Work:
        """:meth:`compute` as the driver's work function."""
        return lambda units, desc: self.compute(ctx, plan, units, desc)

    def overrides(self, ctx: TruthContext) -> list[str]:
        """Overrides a job computing this kind's shards repeats (``needs`` model: the seed)."""
        return [*ctx.overrides, *([f"seed={ctx.seed}"] if self.needs != "task" else [])]

    def load(self, ctx: TruthContext) -> dict | None:
        """The assembled truth: from the cache, or computed where ``on_missing`` allows
        (None: nothing to compare with in this run)."""
        plan = self.plan(ctx)
        shards = driver.load_or_compute(self.work(ctx, plan), plan, ctx.cache_dir, ctx.options,
                                        self.overrides(ctx))
        return self.assemble(ctx, plan, shards)

    def compute_shard(self, ctx: TruthContext, shard: int, num_shards: int) -> Path:
        """Computes (or finds) one shard of a ``num_shards`` split (``stage=ground_truth``)."""
        plan = self.plan(ctx)
        return driver.compute_shard(self.work(ctx, plan), plan, ctx.cache_dir, shard,
                                    num_shards, ctx.options.num_threads)

    def make_plan(self, ctx: TruthContext, units: list[int], meta: dict[str, Tensor],
                  **identity: Any) -> driver.Plan:
        """A plan keyed by :meth:`identity` (plus ``identity``)."""
        key = content_hash(self.identity(ctx, **identity))
        return driver.Plan(ctx.task_name, self.name, key, dict(self.spec), units, meta)


def without_truth_settings(task_cfg: dict[str, Any]) -> dict[str, Any]:
    """``task_cfg`` without the settings of the task-scoped ground truths: what determines
    the attributed model (its cache identity)."""
    settings = {name for name, kind in _KINDS.items() if kind.scope == "task"}
    return {k: v for k, v in task_cfg.items() if k not in settings}


def register_truth(cls: type[GroundTruth]) -> type[GroundTruth]:
    """Class decorator: registers a ground-truth kind under ``cls.name``."""
    if cls.scope not in SCOPES or cls.needs not in NEEDS:
        raise ValueError(f"{cls.__name__}: scope must be one of {SCOPES} and needs one of "
                         f"{NEEDS}")
    existing = _KINDS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"ground-truth kind {cls.name!r} is already registered by "
                         f"{existing.__module__}.{existing.__qualname__}")
    _KINDS[cls.name] = cls
    return cls


def truth_kinds() -> dict[str, type[GroundTruth]]:
    """Every registered kind by name (built-in ones and loaded plug-ins)."""
    return dict(_KINDS)
