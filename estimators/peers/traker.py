"""``traker``: TRAK by its authors (Park et al. 2023, Alg. 1; github.com/MadryLab/trak, 0.3.2).

For each model θ_k of an ensemble, φ_k(z) = Pᵀ ∇θ f(z; θ_k) / √P (TRAK's ``BasicProjector``,
its CPU projector with normal entries, to d = ``projection_dim`` numbers; f the task's
measurement, TRAK's model output; gradients over the tracked parameters) and

    τ(z_q, z_m) = [(1/K) Σ_k φ_k(z_q)ᵀ (Φ_kᵀΦ_k + λ_k I)⁻¹ φ_k(z_m)] · [(1/K) Σ_k (1 − p_k(z_m))]

``[n_queries, n_train]``, p = exp(−L(z_m)) (TRAK's out-to-loss term Q), up to one positive
factor per model (TRAK rescales (ΦᵀΦ + λI)⁻¹ to mean absolute entry 1, which no metric sees).
TRAK's model output class is built from the problem: ``get_output`` = f of one example with
the parameters swapped in (``torch.func``), ``get_out_to_loss_grad`` = 1 − exp(−L) of a
batch. λ_k = ``damping`` × tr(Φ_kᵀΦ_k)/d, as tda-bench's ``trak`` scales it (TRAK's
``lambda_reg`` is set per model before its features are finalised). The ensemble is the
attributed model and models of seeds ``seed + 1, ...`` from the problem's ``model_factory``.
TRAK's memory-mapped features and scores go to the scratch folder, removed after scoring.
"""

from __future__ import annotations

import copy
import logging
import shutil

import torch
from torch import Tensor

from estimators.base import Estimator
from estimators.options import GradientOptions, bounded, number, positive
from estimators.peers.common import (
    FlatBatches,
    Scratch,
    check_per_example_vmap,
    functional_outputs,
    per_example_vmap,
    require,
    tracked_parameter_names,
)
from estimators.peers.dattri_trak import ensemble
from estimators.problem import AttributionProblem

EXPERIMENT = "queries"  # TRAK's name for the set of targets scored


def model_output(problem: AttributionProblem, batches: FlatBatches, model):
    """A TRAK ``AbstractModelOutput`` whose output is the problem's measurement f and whose
    out-to-loss term is 1 − exp(−L)."""
    modelout = require("trak.modelout_functions", "traker")
    outputs = functional_outputs(problem, model)

    class ProblemOutput(modelout.AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        def get_output(self, model, weights, buffers, *leaves: Tensor) -> Tensor:
            batch = batches.rebuild(leaves)
            return problem.measure(outputs({**weights, **buffers}, batch), batch).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, leaves) -> Tensor:
            batch = batches.rebuild(leaves)
            with torch.no_grad():
                loss = problem.loss(outputs({**weights, **buffers}, batch), batch)
            return (1 - torch.exp(-loss)).unsqueeze(-1)

    return ProblemOutput()


class Traker(Estimator):
    """TRAK's ``TRAKer`` with an ensemble of ``n_models``.

    Args:
        n_models: ensemble size K (the attributed model and K − 1 more seeds).
        projection_dim: d.
        damping: λ relative to tr(ΦᵀΦ)/d (as tda-bench's ``trak``).
        seed: the attributed model's seed (the ensemble's first member) and the projection's.
        modules: the tracked layers (``all``, ``mlp_only`` or a regex), as tda-bench's.
        chunk_size: examples per batch of TRAK's featurising and scoring.
        scratch_dir: where TRAK writes its stores (None: a temporary folder).
        keep_scratch: keep those files after scoring.
    """

    name = "traker"

    def __init__(self, n_models: int = 5, projection_dim: int = 512, damping: float = 1e-3,
                 seed: int = 0, modules: str | None = None, chunk_size: int = 256,
                 scratch_dir: str | None = None, keep_scratch: bool = False):
        require("trak", self.name)
        self.n_models = positive("n_models", n_models, integer=True)
        self.projection_dim = positive("projection_dim", projection_dim, integer=True)
        self.damping = bounded("damping", damping, 0)
        self.seed = number("seed", seed, integer=True)
        options = GradientOptions(modules, chunk_size)  # validated as for our estimators
        self.modules, self.chunk_size = options.modules, options.chunk_size
        self.scratch = Scratch(scratch_dir, keep_scratch)
        self.traker = None
        self.states: list[dict] = []
        self.batches: FlatBatches | None = None

    def fit(self, problem: AttributionProblem) -> None:
        trak = require("trak", self.name)
        self.batches = FlatBatches.of(problem)
        check_per_example_vmap(problem, self.batches, self.name, "trak")
        self.states = ensemble(problem, self.n_models, self.seed, self.name)
        model = copy.deepcopy(problem.model).eval()
        save_dir = self.scratch.path / "trak"
        shutil.rmtree(save_dir, ignore_errors=True)  # TRAK resumes from what it finds there
        self.traker = trak.TRAKer(
            model=model, task=model_output(problem, self.batches, model),
            train_set_size=problem.n_train, save_dir=str(save_dir), device=problem.device.type,
            proj_dim=self.projection_dim, use_half_precision=False, projector_seed=self.seed,
            grad_wrt=tracked_parameter_names(problem.model, self.modules or problem.modules),
            logging_level=logging.WARNING)
        store = self.traker.saver
        for k, state in enumerate(self.states):
            self.traker.load_checkpoint(state, model_id=k)
            with per_example_vmap(self.name, "trak"):
                for leaves in self.batches.loader(problem, "train", self.chunk_size):
                    self.traker.featurize(batch=leaves, num_samples=leaves[0].shape[0])
            phi = torch.as_tensor(store.current_store["grads"])
            trace = float(phi.double().pow(2).sum())
            self.traker.score_computer.lambda_reg = self.damping * trace / self.projection_dim
            self.traker.finalize_features(model_ids=[k])

    def score(self, problem: AttributionProblem) -> Tensor:
        """``[n_queries, n_train]``: TRAK's scores, transposed (positive = proponent)."""
        if self.traker is None:
            self.fit(problem)
        projector = self.traker.projector
        for k, state in enumerate(self.states):
            self.traker.start_scoring_checkpoint(EXPERIMENT, state, model_id=k,
                                                 num_targets=problem.n_queries)
            if k == projector.model_id and not getattr(projector, "proj_matrix_available", 1):
                # TRAK 0.3.2's one-block BasicProjector (d <= 100) frees its matrix when the
                # features are finalised and would not regenerate it for the same model
                projector.generate_sketch_matrix(projector.generator_states[0])
            with per_example_vmap(self.name, "trak"):
                for leaves in self.batches.loader(problem, "queries", self.chunk_size):
                    self.traker.score(batch=leaves, num_samples=leaves[0].shape[0])
        scores = torch.as_tensor(self.traker.finalize_scores(EXPERIMENT)).T.clone()
        self.traker = None
        self.scratch.done()
        return scores.float()
