"""kronfluence (Bae et al., github.com/pomonam/kronfluence, 1.0.1) behind tda-bench's contract.

kronfluence's user contract is a ``Task`` with two methods; both come from the problem:

* ``compute_train_loss(batch, model, sample)`` = Σ_b L(z_b) (summed over the batch, as
  kronfluence requires), with targets drawn by ``problem.sample_targets`` when ``sample``
  (the true Fisher, ``fisher: true``) and the data labels otherwise;
* ``compute_measurement(batch, model)`` = −Σ_b f(z_b): kronfluence's pairwise score
  ∇m(z_q)ᵀ (F̂ + λI)⁻¹ ∇L(z_m) is positive when the training example *lowers* the
  measurement m (its examples measure a loss), so with m = −f the score is
  −∇f(z_q)ᵀ (F̂ + λI)⁻¹ ∇L(z_m), tda-bench's sign convention (positive = proponent).

The tracked modules are tda-bench's (``modules``: :func:`~estimators.gradients.tracked_layers`);
kronfluence itself supports ``nn.Linear`` and ``nn.Conv2d`` only. The model is deep-copied
before kronfluence wraps its modules (it freezes every parameter of the model it is given).
Factors and scores are written under the scratch folder, which is removed after scoring
(a later ``self_influence`` refits). A float64 model runs kronfluence in float64 throughout
(its defaults are float32 covariances, per-example gradients and scores).

Damping (kronfluence's ``damping_factor``, Grosse et al. 2023 eq. 21's λ): a number λ gives
``damping_factor = λ₂ + λ``, the same damped curvature F̂ + (λ₂ + λ)I that tda-bench's
``kfac``/``ekfac`` invert (λ₂: the task's L2 coefficient, which kronfluence does not know
about); ``null`` gives kronfluence's own heuristic 0.1 × mean(Λ) per module *without* λ₂,
so on a task with λ₂ > 0 it differs from our ``damping: null`` by λ₂ (docs/estimators.md).
"""

from __future__ import annotations

import copy
import logging
from typing import ClassVar

import torch
from torch import Tensor, nn

from estimators.base import Estimator
from estimators.gradients import tracked_layers
from estimators.options import GradientOptions, bounded, choice, number, positive
from estimators.peers.common import Scratch, require
from estimators.problem import AttributionProblem, Batch

FISHERS = ("true", "empirical")
FACTOR_DTYPES = ("activation_covariance_dtype", "gradient_covariance_dtype",
                 "per_sample_gradient_dtype", "lambda_dtype")
SCORE_DTYPES = ("query_gradient_svd_dtype", "per_sample_gradient_dtype", "precondition_dtype",
                "score_dtype")
NAME = "tda_bench"  # kronfluence's analysis, factors and scores names inside the scratch folder


def problem_task(problem: AttributionProblem, modules: list[str], generator: torch.Generator):
    """A kronfluence ``Task`` whose loss, measurement and sampled targets are the problem's."""
    task_module = require("kronfluence.task", "kronfluence")

    class ProblemTask(task_module.Task):
        def compute_train_loss(self, batch: Batch, model: nn.Module, sample: bool = False
                               ) -> Tensor:
            outputs = problem.outputs(model, batch)
            if sample:
                batch = problem.sample_targets(outputs, batch, generator)
            return problem.loss(outputs, batch).sum()

        def compute_measurement(self, batch: Batch, model: nn.Module) -> Tensor:
            return -problem.measure(problem.outputs(model, batch), batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return modules

        def get_attention_mask(self, batch: Batch) -> Tensor | None:
            return loss_positions(problem, batch)

    return ProblemTask()


def loss_positions(problem: AttributionProblem, batch: Batch) -> Tensor | None:
    """``[B, T]``: 1 where a position's output enters the training loss, for sequence outputs
    ``[B, T, V]`` (None otherwise). kronfluence averages its A over these tokens, as ours does
    over the tokens that carry gradient: not padding, not a document's last position."""
    with torch.no_grad():
        outputs = problem.outputs(problem.model, batch)
    if outputs.dim() < 3:
        return None
    outputs = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(problem.loss(outputs, batch).sum(), outputs)
    return (grad != 0).any(-1).long()  # as a tokenizer's attention mask


def _precision(model: nn.Module) -> tuple[dict, dict]:
    """kronfluence's dtypes for a float64 model: float64 throughout (its defaults are float32
    covariances, gradients and scores, which on a float64 model leave a float32 round-off that
    relative damping amplifies); other models keep kronfluence's defaults."""
    if next(model.parameters()).dtype != torch.float64:
        return {}, {}
    return ({k: torch.float64 for k in FACTOR_DTYPES}, {k: torch.float64 for k in SCORE_DTYPES})


class _Root(nn.Module):
    """The model as a child module: kronfluence wraps tracked modules in their parent, so a
    model that is itself a tracked layer (a bare ``nn.Linear``) needs one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class Kronfluence(Estimator):
    """One kronfluence strategy (``identity``, ``diagonal``, ``kfac`` or ``ekfac``).

    Args:
        fisher: ``true`` (targets sampled from the model) or ``empirical`` (data labels).
        damping: λ on top of the task's λ₂ (``damping_factor = λ₂ + λ``); None for
            kronfluence's heuristic 0.1 × mean(Λ) per module (without λ₂).
        batch_size: training examples per batch of the factor passes.
        seed: seeds the true Fisher's target sampling.
        modules: the tracked layers (``all``, ``mlp_only`` or a regex), as tda-bench's.
        chunk_size: training examples per batch while scoring.
        query_batch_size: queries per batch (None: all at once).
        scratch_dir: where kronfluence writes factors and scores (None: a temporary folder).
        keep_scratch: keep those files after scoring.
    """

    strategy: ClassVar[str] = "ekfac"
    name: ClassVar[str] = "kronfluence_ekfac"

    def __init__(self, fisher: str = "true", damping: float | None = None,
                 batch_size: int = 64, seed: int = 0, modules: str | None = None,
                 chunk_size: int = 256, query_batch_size: int | None = None,
                 scratch_dir: str | None = None, keep_scratch: bool = False):
        require("kronfluence", self.name)
        fisher = "true" if fisher is True else fisher  # `estimator.fisher=true` parses as bool
        self.fisher = choice("fisher", fisher, FISHERS)
        self.damping = bounded("damping", damping, 0, allow_none=True)
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.seed = number("seed", seed, integer=True)
        options = GradientOptions(modules, chunk_size)  # validated as for our estimators
        self.modules, self.chunk_size = options.modules, options.chunk_size
        self.query_batch_size = positive("query_batch_size", query_batch_size, integer=True,
                                         allow_none=True)
        self.scratch = Scratch(scratch_dir, keep_scratch)
        self.analyzer = None

    def _arguments(self, problem: AttributionProblem):
        arguments = require("kronfluence.arguments", self.name)
        factor_dtypes, score_dtypes = _precision(problem.model)
        factor_args = arguments.FactorArguments(
            strategy=self.strategy, use_empirical_fisher=self.fisher == "empirical",
            **factor_dtypes)
        damping = None if self.damping is None else problem.l2 + self.damping
        score_args = arguments.ScoreArguments(damping_factor=damping, **score_dtypes)
        return factor_args, score_args

    def _loader_kwargs(self, problem: AttributionProblem):
        dataset = require("kronfluence.utils.dataset", self.name)
        return dataset.DataLoaderKwargs(collate_fn=problem.collate_fn)

    def fit(self, problem: AttributionProblem) -> None:
        if self.fisher == "true" and problem.sample_targets is None:
            raise ValueError("This task defines no sample_targets, so the true Fisher cannot be "
                             "sampled; set estimator.fisher=empirical.")
        analyzer_module = require("kronfluence.analyzer", self.name)
        generator = torch.Generator().manual_seed(self.seed)
        tracked = tracked_layers(problem.model, self.modules or problem.modules)
        modules = [layer.name for layer in tracked]
        model = copy.deepcopy(problem.model)
        if "" in modules:  # the model is a tracked layer itself
            model, modules = _Root(model), [f"inner.{m}".rstrip(".") for m in modules]
        task = problem_task(problem, modules, generator)
        model = analyzer_module.prepare_model(model, task)
        self.analyzer = analyzer_module.Analyzer(
            NAME, model, task, cpu=problem.device.type == "cpu", disable_tqdm=True,
            log_level=logging.WARNING, output_dir=str(self.scratch.path))
        factor_args, _ = self._arguments(problem)
        self.analyzer.fit_all_factors(
            NAME, problem.train, per_device_batch_size=self.batch_size,
            dataloader_kwargs=self._loader_kwargs(problem), factor_args=factor_args,
            overwrite_output_dir=True)

    def score(self, problem: AttributionProblem) -> Tensor:
        """``[n_queries, n_train]``: kronfluence's pairwise scores (positive = proponent)."""
        if self.analyzer is None:
            self.fit(problem)
        _, score_args = self._arguments(problem)
        self.analyzer.compute_pairwise_scores(
            NAME, NAME, problem.queries, problem.train,
            per_device_query_batch_size=self.query_batch_size or problem.n_queries,
            per_device_train_batch_size=self.chunk_size,
            dataloader_kwargs=self._loader_kwargs(problem), score_args=score_args,
            overwrite_output_dir=True)
        scores = self.analyzer.load_pairwise_scores(NAME)["all_modules"].clone()
        self.scratch.done()
        self.analyzer = None
        return scores

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        """``[n_train]``: kronfluence's self-influence ∇Lᵀ (F̂ + λI)⁻¹ ∇L."""
        if self.analyzer is None:
            self.fit(problem)
        _, score_args = self._arguments(problem)
        self.analyzer.compute_self_scores(
            f"{NAME}_self", NAME, problem.train, per_device_train_batch_size=self.chunk_size,
            dataloader_kwargs=self._loader_kwargs(problem), score_args=score_args,
            overwrite_output_dir=True)
        values = self.analyzer.load_self_scores(f"{NAME}_self")["all_modules"].clone()
        self.scratch.done()
        self.analyzer = None
        return values
