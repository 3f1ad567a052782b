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
labels). Optional ``query_rank`` keeps the rank-r SVD of each preconditioned query gradient
(Grosse et al. §3.2.3). Fitted factors are cached under ``cache_dir`` by the problem's ``key``
and the fitting settings, so a second run on the same model does not refit; EK-FAC reuses
K-FAC's first pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from estimators.atomic import atomic_write, content_hash, load_checked
from estimators.base import EXACT_GRADIENTS, GradientEstimator
from estimators.gradients import GradientEngine, LayerGrads
from estimators.options import bounded, choice, number, positive
from estimators.problem import AttributionProblem, Batch, eval_mode, move_to

log = logging.getLogger(__name__)

FISHERS = ("true", "empirical")
HEURISTIC_DAMPING = 0.1  # damping: null = λ₂ + 0.1 × mean eigenvalue (kronfluence: no λ₂)
FACTORS_VERSION = 1  # bump when the factor computation changes (part of the cache key)

Factors = dict[str, dict[str, Tensor]]  # layer -> {"q_a" [i, i], "q_s" [o, o], "lam" [o, i]}


def fisher_loss(problem: AttributionProblem, fisher: str,
                generator: torch.Generator) -> Callable[[nn.Module, Batch], Tensor]:
    """The per-example loss ``[B]`` whose gradients sample the Fisher.

    ``true``: targets drawn from the model's predictive distribution with ``generator``;
    ``empirical``: the data labels (the training loss itself).
    """
    if fisher == "empirical":
        return problem.train_loss
    if problem.sample_targets is None:
        raise ValueError("This task defines no sample_targets, so the true Fisher cannot be "
                         "sampled; set estimator.fisher=empirical.")

    def sampled_loss(model: nn.Module, batch: Batch) -> Tensor:
        outputs = problem.outputs(model, batch)
        return problem.loss(outputs, problem.sample_targets(outputs, batch, generator))

    return sampled_loss


def _passes(problem: AttributionProblem, batch_size: int, desc: str):
    """Iterates over training batches (model in eval mode) with a progress bar."""
    with eval_mode(problem.model):
        for batch in tqdm(problem.loader("train", batch_size), desc=desc, leave=False,
                          disable=None):
            yield move_to(batch, problem.device)


def covariance_factors(problem: AttributionProblem, engine: GradientEngine, loss_fn: Callable,
                       batch_size: int) -> dict[str, tuple[Tensor, Tensor]]:
    """First pass: ``{layer: (A [i, i], S [o, o])}`` in float64 (see module docstring)."""
    sums: dict[str, list] = {}
    for batch in _passes(problem, batch_size, "K-FAC factors"):
        for name, (a, g) in engine.capture(loss_fn, batch).items():
            tokens = a.shape[0] * a.shape[1]  # examples × (tokens × calls of the layer)
            a = a.reshape(tokens, -1).double()
            g = g.reshape(tokens, -1).double()
            if not (torch.isfinite(a).all() and torch.isfinite(g).all()):
                raise FloatingPointError(
                    f"Non-finite activations or gradients in layer '{name}' while fitting "
                    "K-FAC factors: check the model and inputs, or train in float64.")
            acc = sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + (a.T @ a).cpu()
            acc[1] = acc[1] + (g.T @ g).cpu()
            acc[2] += tokens
    # A: mean over tokens; S: summed over an example's tokens, mean over examples.
    return {name: (a / tokens, g / problem.n_train) for name, (a, g, tokens) in sums.items()}


def eigenbasis(factors: dict[str, tuple[Tensor, Tensor]]) -> Factors:
    """Eigendecomposes A and S (float64); ``lam`` holds K-FAC's Λᵢⱼ = sᵢ aⱼ ``[o, i]``."""
    out = {}
    for name, (a, s) in factors.items():
        eig_a, q_a = torch.linalg.eigh(a)
        eig_s, q_s = torch.linalg.eigh(s)
        lam = eig_s.clamp(min=0)[:, None] * eig_a.clamp(min=0)[None, :]
        out[name] = {"q_a": q_a, "q_s": q_s, "lam": lam}
    return out


def corrected_eigenvalues(problem: AttributionProblem, engine: GradientEngine,
                          loss_fn: Callable, basis: Factors, batch_size: int) -> dict[str, Tensor]:
    """Second pass (EK-FAC): ``{layer: Λ [o, i]}`` = (1/N) Σₙ (Q_Sᵀ Gₙ Q_A)², float64."""
    sums: dict[str, Tensor] = {}
    for batch in _passes(problem, batch_size, "EK-FAC eigenvalues"):
        for name, grad in engine.gradients(loss_fn, batch).items():
            q_a = basis[name]["q_a"].to(grad.device)
            q_s = basis[name]["q_s"].to(grad.device)
            rotated = q_s.T @ grad.double() @ q_a
            sums[name] = sums.get(name, 0.0) + rotated.pow(2).sum(0).cpu()
    return {name: total / problem.n_train for name, total in sums.items()}


class FactorCache:
    """Fitted factors on disk: one ``torch.save`` file per key, written atomically.

    Args:
        directory: where the files go; None disables the cache.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory else None

    def load(self, key: str) -> dict | None:
        if self.directory is None:
            return None
        return load_checked(self.directory / f"{key}.pt", key)

    def save(self, key: str, payload: dict) -> None:
        if self.directory is None:
            return
        with atomic_write(self.directory / f"{key}.pt") as tmp:
            torch.save({**payload, "key": key}, tmp)


class KFAC(GradientEstimator):
    """Influence through K-FAC's damped inverse (see module docstring).

    Args:
        fisher: ``true`` (targets sampled from the model, default) or ``empirical``.
        damping: λ added to the eigenvalues (on top of the task's λ₂); None for the
            per-layer heuristic 0.1 × mean(Λ), also on top of λ₂.
        batch_size: training examples per batch of the factor passes.
        query_rank: keep the rank-r SVD of each preconditioned query gradient per layer
            (Grosse et al. §3.2.3); None keeps it exact.
        seed: seed of the true Fisher's target sampling.
        cache_dir: directory of the factor cache (under ``<cache_dir>/factors``); None
            disables it. Used only when the problem has a ``key``.
        **kwargs: ``modules``, ``chunk_size``, ``per_layer`` (see
            :class:`~estimators.base.GradientEstimator`).
    """

    name = "kfac"
    correct_eigenvalues = False
    unsupported = EXACT_GRADIENTS

    def __init__(self, fisher: str = "true", damping: float | None = None, batch_size: int = 64,
                 query_rank: int | None = None, seed: int = 0, cache_dir: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        fisher = "true" if fisher is True else fisher  # `estimator.fisher=true` parses as bool
        self.fisher = choice("fisher", fisher, FISHERS)
        self.damping = bounded("damping", damping, 0, allow_none=True)  # None: heuristic
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.query_rank = positive("query_rank", query_rank, integer=True, allow_none=True)
        self.seed = number("seed", seed, integer=True)
        self.cache = FactorCache(Path(cache_dir) / "factors" if cache_dir else None)
        self.factors: Factors | None = None
        self.dampings: dict[str, float] = {}
        self.loaded_from_cache = False

    def _spec(self, problem: AttributionProblem, engine: GradientEngine, what: str) -> dict:
        """Everything that determines a fitted quantity: its cache identity."""
        return {"problem": problem.key, "what": what, "version": FACTORS_VERSION,
                "fisher": self.fisher, "seed": self.seed, "batch_size": self.batch_size,
                "layers": [[layer.name, *layer.shape] for layer in engine.layers],
                "n_train": problem.n_train, "l2": problem.l2, "device": problem.device.type}

    def _cached(self, problem: AttributionProblem, spec: dict, compute: Callable[[], dict]):
        """``compute()``'s payload, from the cache when the problem has a key."""
        key = content_hash(spec) if problem.key else None
        payload = self.cache.load(key) if key else None
        if payload is not None:
            log.info("Loaded %s from the factor cache (%s)", spec["what"], key)
            self.loaded_from_cache = True
            return payload
        payload = compute()
        if key:
            self.cache.save(key, payload)
        return payload

    def fit(self, problem: AttributionProblem) -> None:
        engine = self.engine(problem)
        generator = torch.Generator().manual_seed(self.seed)
        loss_fn = fisher_loss(problem, self.fisher, generator)
        self.loaded_from_cache = False
        spec = self._spec(problem, engine, "kfac eigenbasis")

        def first_pass() -> dict:
            return {"factors": eigenbasis(covariance_factors(problem, engine, loss_fn,
                                                             self.batch_size))}

        factors = self._cached(problem, spec, first_pass)["factors"]
        if self.correct_eigenvalues:
            # A fresh generator: the second pass does not depend on whether the first was cached.
            generator.manual_seed(self.seed + 1)

            def second_pass() -> dict:
                return {"lam": corrected_eigenvalues(problem, engine, loss_fn, factors,
                                                     self.batch_size)}

            spec = {**spec, "what": "ekfac eigenvalues"}
            lam = self._cached(problem, spec, second_pass)["lam"]
            factors = {n: {**f, "lam": lam[n]} for n, f in factors.items()}
        self.factors = factors
        self.dampings = {
            n: (HEURISTIC_DAMPING * f["lam"].mean().item() if self.damping is None
                else self.damping)
            for n, f in factors.items()
        }

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        """``{layer: [Q, o, i]}`` -> Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ₂ + λ)] Q_Aᵀ per layer."""
        if self.factors is None or set(self.factors) != set(engine.names):
            self.fit(problem)
        out = {}
        for name, grad in query_grads.items():
            f = self.factors[name]
            q_a, q_s = f["q_a"].to(grad.device), f["q_s"].to(grad.device)
            denom = (f["lam"] + problem.l2 + self.dampings[name]).to(grad.device)
            if (denom <= 0).any():
                raise ValueError(f"Layer '{name}' has a zero damped eigenvalue: set "
                                 "estimator.damping > 0 or null (heuristic).")
            pre = q_s @ ((q_s.T @ grad.double() @ q_a) / denom) @ q_a.T
            out[name] = low_rank(pre, self.query_rank) if self.query_rank else pre
        return out


class EKFAC(KFAC):
    """K-FAC with EK-FAC's eigenvalue correction (George et al. 2018); same arguments."""

    name = "ekfac"
    correct_eigenvalues = True


def low_rank(matrices: Tensor, rank: int) -> Tensor:
    """The best rank-``rank`` approximation (truncated SVD) of each ``[Q, o, i]`` matrix."""
    if rank >= min(matrices.shape[-2:]):
        return matrices
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
