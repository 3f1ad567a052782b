"""``kfac`` and ``ekfac``: Kronecker-factored inverse curvature, one implementation.

    score(q, m) = −∇θ f(z_q)ᵀ (F̂ + (λ₂ + λ) I)⁻¹ ∇θ L(z_m)       (Grosse et al. 2023, eq. 1)

with F̂ block-diagonal over the tracked linear layers. For a layer with input ā (homogeneous 1
appended for the bias) and pre-activation gradient g, the Fisher of the mean training
objective (1/N) Σₙ Lₙ is (1/N) Σₙ vec(Gₙ) vec(Gₙ)ᵀ, Gₙ = Σₜ gₙₜ āₙₜᵀ ``[d_out, d_in(+1)]``.

* **K-FAC** (Martens & Grosse 2015; Grosse et al. §3.1, eq. 18): F̂ = A ⊗ S with
  A = E[ā āᵀ] over every token of every example and S = (1/N) Σₙ Σₜ gₙₜ gₙₜᵀ (tokens summed
  within an example, as they are in Gₙ; for non-sequence inputs both are plain means over
  examples). With A = Q_A diag(a) Q_Aᵀ and S = Q_S diag(s) Q_Sᵀ (float64), the damped inverse
  is exact in the eigenbasis: Λᵢⱼ = sᵢ aⱼ.
* **EK-FAC** (George et al. 2018; Grosse et al. §3.2, eq. 20): the same eigenbasis, with the
  eigenvalues re-fitted in a second pass over per-example gradients,
  Λ = (1/N) Σₙ (Q_Sᵀ Gₙ Q_A)².

Preconditioning a query gradient V ``[d_out, d_in(+1)]`` of a layer (Grosse et al. eq. 21):

    P V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ₂ + λ)] Q_Aᵀ

with λ₂ the task's L2 coefficient and λ the damping: a number, or per layer 0.1 × mean(Λ)
when ``damping: null`` (kronfluence's heuristic, here on top of λ₂, which kronfluence lacks:
on a task with λ₂ > 0 its default divides by Λ + 0.1 mean(Λ), this by Λ + λ₂ + 0.1 mean(Λ)).
The gradients g come from ``fisher: true`` (targets
sampled from the model, ``problem.sample_targets``, seeded) or ``fisher: empirical`` (data
labels).

The passes over the training set (:mod:`estimators.kfac_factors`) are sums over blocks of
examples computed from the layers' captured factors (the eigenvalue pass, with the same
sampled targets, reuses the first pass's where the memory budget allows), so they shard
across jobs (:meth:`KFAC.fit_passes`, ``stage=factors``); eigenbases and Λ are stored in the
gradient dtype (float64 for a float64 model). Scoring is layer-wise
(:mod:`estimators.scoring`): a query's exact P V is kept as its tokens' factors rotated into
the eigenbasis with the damped inverse eigenvalues as a scale, or dense; ``query_rank: r``
keeps rank-r factors of each layer's P V instead (Grosse et al. §3.2.3), from a seeded
randomized SVD (``query_svd: randomized``; Halko et al. 2011) or the exact truncated SVD
(``exact``), so Q queries cost Q·r·(o + i) numbers per layer. Fitted factors are cached
under ``cache_dir`` by the problem's ``key`` and the fitting settings, so a second run on
the same model does not refit; EK-FAC reuses K-FAC's first pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from estimators import kfac_factors as passes
from estimators import layerwise, memory
from estimators.accumulate import FitPass
from estimators.atomic import content_hash, load_checked, save_checked
from estimators.base import EXACT_GRADIENTS, GradientEstimator
from estimators.gradients import GradientEngine, LayerGrads, score_dtype
from estimators.layerwise import LayerPreconditioner
from estimators.options import OptionError, bounded, choice, natural, positive
from estimators.problem import AttributionProblem

log = logging.getLogger(__name__)

FISHERS = passes.FISHERS
QUERY_SVDS = ("randomized", "exact")
REFIT_TARGETS = ("shared", "fresh")
HEURISTIC_DAMPING = 0.1  # damping: null = λ₂ + 0.1 × mean eigenvalue (kronfluence: no λ₂)
FACTORS_VERSION = 3  # bump when the factor computation changes (part of the cache key)

Factors = dict[str, dict[str, Tensor]]  # layer -> {"q_a" [i, i], "q_s" [o, o], "lam" [o, i]}


class FactorCache:
    """Fitted factors on disk: one verified file per key (:mod:`estimators.atomic`: atomic,
    byte-identical for the same factors, its key, slot and checksum checked on load).

    Args:
        directory: where the files go; None disables the cache.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory else None

    def load(self, key: str, slot: str | None = None) -> dict | None:
        if self.directory is None:
            return None
        return load_checked(self.directory / f"{key}.pt", key, slot)

    def save(self, key: str, payload: dict, slot: str | None = None) -> None:
        if self.directory is None:
            return
        save_checked({**payload, "key": key}, self.directory / f"{key}.pt", slot)


class KFAC(GradientEstimator):
    """Influence through K-FAC's damped inverse (see module docstring).

    Args:
        fisher: ``true`` (targets sampled from the model, default) or ``empirical``.
        damping: λ added to the eigenvalues (on top of the task's λ₂); None for the
            per-layer heuristic 0.1 × mean(Λ), also on top of λ₂.
        batch_size: training examples per block of the factor passes (at most: the memory
            budget may lower it).
        query_rank: keep rank-r factors of each preconditioned query gradient per layer
            (Grosse et al. §3.2.3); None keeps it exact.
        query_svd: how the rank-r factors are found: ``randomized`` (seeded, Halko et al.
            2011) or ``exact`` (truncated SVD).
        query_svd_oversampling: extra columns of the randomized range finder.
        query_svd_iterations: power iterations of the randomized range finder.
        seed: seed of the true Fisher's target sampling and of the randomized SVD.
        refit_targets: EK-FAC's eigenvalue pass under the true Fisher: ``shared`` re-fits Λ on
            the covariance pass's sampled targets (its captured factors are reused where the
            memory budget allows: one forward and backward pass instead of two), ``fresh``
            draws new targets (a second pass; less seed-to-seed spread on small problems,
            docs/estimators.md). The same under the empirical Fisher.
        cache_dir: directory of the factor cache (under ``<cache_dir>/factors``); None
            disables it. Used only when the problem has a ``key``.
        **kwargs: ``modules``, ``chunk_size``, ``per_layer`` (see
            :class:`~estimators.base.GradientEstimator`).
    """

    name = "kfac"
    correct_eigenvalues = False
    unsupported = EXACT_GRADIENTS

    def __init__(self, fisher: str = "true", damping: float | None = None, batch_size: int = 64,
                 query_rank: int | None = None, query_svd: str = "randomized",
                 query_svd_oversampling: int = 8, query_svd_iterations: int = 2, seed: int = 0,
                 refit_targets: str = "shared", cache_dir: str | None = None, **kwargs):
        super().__init__(**kwargs)
        fisher = "true" if fisher is True else fisher  # `estimator.fisher=true` parses as bool
        self.fisher = choice("fisher", fisher, FISHERS)
        self.damping = bounded("damping", damping, 0, allow_none=True)  # None: heuristic
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.query_rank = positive("query_rank", query_rank, integer=True, allow_none=True)
        self.query_svd = choice("query_svd", query_svd, QUERY_SVDS)
        self.query_svd_oversampling = int(bounded("query_svd_oversampling",
                                                  query_svd_oversampling, 0))
        self.query_svd_iterations = int(bounded("query_svd_iterations", query_svd_iterations, 0))
        self.seed = natural("seed", seed)
        self.refit_targets = choice("refit_targets", refit_targets, REFIT_TARGETS)
        self.cache = FactorCache(Path(cache_dir) / "factors" if cache_dir else None)
        self.factors: Factors | None = None
        self.dampings: dict[str, float] = {}
        self.loaded_from_cache = False
        self.block: int | None = None  # examples per block of the passes (memory plan)
        self.keep_bytes = 0.0  # what the plan leaves for the covariance pass's kept factors

    def _spec(self, problem: AttributionProblem, engine: GradientEngine, what: str) -> dict:
        """Everything that determines a fitted quantity: its cache identity."""
        return {"problem": problem.key, "what": what, "version": FACTORS_VERSION,
                "fisher": self.fisher, "seed": self.seed, "batch_size": self.batch_size,
                "layers": [[layer.name, *layer.shape] for layer in engine.layers],
                "n_train": problem.n_train, "l2": problem.l2, "device": problem.device.type,
                "dtype": str(score_dtype(problem.model))}

    def _load(self, problem: AttributionProblem, spec: dict) -> dict | None:
        key = content_hash(spec) if problem.key else None
        payload = self.cache.load(key, spec["what"]) if key else None
        if payload is not None:
            log.info("Loaded %s from the factor cache (%s)", spec["what"], key)
            self.loaded_from_cache = True
        return payload

    def _save(self, problem: AttributionProblem, spec: dict, payload: dict) -> None:
        if problem.key:
            self.cache.save(content_hash(spec), payload, spec["what"])

    # -- the memory plan of the passes ------------------------------------------------------
    def plan_fit(self, problem: AttributionProblem, budget: memory.Budget | None = None,
                 saved: bool = False) -> int:
        """The examples per block of the factor passes that fit the budget (at most
        ``batch_size``); ``saved``: the partial sums are also written (sharded passes)."""
        budget = budget or self.memory_budget or memory.budget(None, problem.device)
        self.memory_budget = budget
        engine = self.engine(problem)
        from estimators.scoring import capture_bytes, probe

        act, tokens = probe(problem, engine, "train")
        elem = torch.empty((), dtype=passes.accumulation_dtype(problem.model)).element_size()
        largest = max(o * i for o, i in (layer.shape for layer in engine.layers))
        acc = max(passes.accumulator_bytes(engine, "covariance"),
                  passes.accumulator_bytes(engine, "eigenvalues"))
        # the eigenbasis is held beside either pass's sums: it is built while the covariance
        # sums still exist (finish), then the eigenvalue pass accumulates beside it
        fixed = {"model": memory.parameter_bytes(problem.model),
                 "sums": acc * (2 if saved else 1), "eigenbasis": self._basis_bytes(engine),
                 "finish": passes.finish_bytes(engine)}
        per_example = (act * memory.BACKWARD_FACTOR + capture_bytes(engine, tokens, elem) * 3
                       + largest * elem * 2)
        self.block = budget.batch(fixed, per_example, self.batch_size,
                                  f"{self.name}'s factor passes", "estimator.batch_size",
                                  "raise memory_budget_mb or attribute through fewer layers "
                                  "(estimator.modules)")
        self.keep_bytes = max(0.0, budget.total - sum(fixed.values()) - self.block * per_example)
        return self.block

    def _basis_bytes(self, engine: GradientEngine) -> float:
        """The fitted factors: Q_A [i, i], Q_S [o, o] and Λ [o, i] per layer."""
        elem = torch.empty((), dtype=score_dtype(engine.model)).element_size()
        return float(sum((i * i + o * o + o * i) * elem
                         for o, i in (layer.shape for layer in engine.layers)))

    def state_bytes(self, engine: GradientEngine) -> float:
        """The factors and, beside them while scoring, each layer's 1 / (Λ + λ₂ + λ)."""
        elem = torch.empty((), dtype=score_dtype(engine.model)).element_size()
        return self._basis_bytes(engine) + float(sum(
            o * i * elem for o, i in (layer.shape for layer in engine.layers)))

    # -- the fit: cached, or passes over blocks (sharded by the harness) --------------------
    def fit_passes(self, problem: AttributionProblem) -> Iterator[FitPass]:
        engine = self.engine(problem)
        self._check_all_parameters(engine, None)
        self.loaded_from_cache = False
        if self.block is None:
            self.plan_fit(problem)
        block, n_blocks = self.block, passes.n_blocks(problem, self.block)
        spec = self._spec(problem, engine, "kfac eigenbasis")
        cached = self._load(problem, spec)
        loss_fn = passes.fisher_loss(problem, self.fisher, self.seed, 0)
        fresh = self.fisher == "true" and self.refit_targets == "fresh"
        kept = passes.Kept(self.keep_bytes) if self.correct_eigenvalues and not fresh else None
        refit_loss = passes.fisher_loss(problem, self.fisher, self.seed, 1) if fresh else loss_fn
        if cached is None:

            def finish_covariance(payloads: list[dict]) -> None:
                again = self._load(problem, spec)  # another job may have finished it
                factors = again["factors"] if again is not None else passes.eigenbasis(
                    payloads, engine, problem.n_train, score_dtype(problem.model))
                if again is None:
                    self._save(problem, spec, {"factors": factors})
                self.factors = factors

            yield FitPass("covariance", content_hash({**spec, "pass": "covariance",
                                                      "block": block}), n_blocks,
                          lambda blocks: passes.covariance_pass(problem, engine, loss_fn, block,
                                                                blocks, kept),
                          finish_covariance)
            factors = self.factors
        else:
            factors = cached["factors"]
        if self.correct_eigenvalues:
            spec = {**spec, "what": "ekfac eigenvalues",
                    "refit_targets": "fresh" if fresh else "shared"}
            cached = self._load(problem, spec)
            if cached is None:
                basis = factors

                def finish_eigenvalues(payloads: list[dict]) -> None:
                    again = self._load(problem, spec)
                    lam = again["lam"] if again is not None else passes.eigenvalues(
                        payloads, engine, problem.n_train, score_dtype(problem.model))
                    if again is None:
                        self._save(problem, spec, {"lam": lam})
                    self.factors = {n: {**f, "lam": lam[n]} for n, f in basis.items()}

                yield FitPass("eigenvalues", content_hash({**spec, "pass": "eigenvalues",
                                                           "block": block}), n_blocks,
                              lambda blocks: passes.eigenvalue_pass(problem, engine, refit_loss,
                                                                    basis, block, blocks, kept),
                              finish_eigenvalues)
                factors = self.factors
            else:
                factors = {n: {**f, "lam": cached["lam"][n]} for n, f in factors.items()}
        if kept is not None:
            kept.blocks.clear()
        self.factors = factors
        self.dampings = {
            n: (HEURISTIC_DAMPING * f["lam"].double().mean().item() if self.damping is None
                else self.damping)
            for n, f in factors.items()
        }

    # -- preconditioning, layer by layer ----------------------------------------------------
    def layer_preconditioners(self, problem: AttributionProblem,
                              engine: GradientEngine) -> dict[str, LayerPreconditioner]:
        """Per layer (Q_S, Q_A) and 1 / (Λ + λ₂ + λ), on the problem's device."""
        if self.factors is None or set(self.factors) != set(engine.names):
            self.fit(problem)
        dtype, device = score_dtype(problem.model), problem.device
        out = {}
        for name in engine.names:
            f = self.factors[name]
            denom = f["lam"].double() + problem.l2 + self.dampings[name]
            if (denom <= 0).any():
                raise OptionError(f"Layer '{name}' has a zero damped eigenvalue: set {{damping}} "
                                  "> 0, or {damping=null} (the heuristic).")
            basis = (f["q_s"].to(device, dtype), f["q_a"].to(device, dtype))
            out[name] = LayerPreconditioner(basis, denom.reciprocal().to(device, dtype))
        return out

    def low_rank(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Rank-``query_rank`` factors ``(left [Q, r, o], right [Q, r, i])`` of ``[Q, o, i]``."""
        if self.query_svd == "exact":
            return layerwise.exact_svd(v, self.query_rank)
        generator = torch.Generator().manual_seed(self.seed)
        return layerwise.randomized_svd(v, self.query_rank, self.query_svd_oversampling,
                                        self.query_svd_iterations, generator)

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        """Dense ``{layer: [Q, o, i]}`` -> Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ₂ + λ)] Q_Aᵀ per layer
        (rank-r with ``query_rank``). Scoring does not use it (it is layer-wise); for callers
        that want P V itself."""
        pres = self.layer_preconditioners(problem, engine)
        out = {}
        for name, grad in query_grads.items():
            pre = pres[name]
            dense = layerwise.precondition_dense(pre, grad.to(pre.scale.dtype))
            if self.query_rank and self.query_rank < min(grad.shape[-2:]):
                left, right = self.low_rank(dense)
                dense = torch.einsum("qko,qki->qoi", left, right)
            out[name] = dense
        return out


class EKFAC(KFAC):
    """K-FAC with EK-FAC's eigenvalue correction (George et al. 2018); same arguments."""

    name = "ekfac"
    correct_eigenvalues = True
