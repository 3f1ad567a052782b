"""``bergson``: EleutherAI's bergson (github.com/EleutherAI/bergson), which does not run here.

bergson 2.5.1 (the registry's latest when this was written) installs beside torch 2.13's CPU
build, but imports only after the torchvision and torchaudio it pulls in are removed (both
link CUDA; torchvision then breaks ``import transformers``), and it brings datasets, peft,
bitsandbytes and accelerate. More to the point, its contract is not the problem's: it
collects gradients of a Hugging Face ``PreTrainedModel`` over a ``datasets.Dataset`` of
``input_ids`` with a next-token loss it computes itself (``bergson.collector``), so neither a
task's loss and measurement nor a non-language model can be handed to it without
task-specific code. The estimator therefore refuses on construction, in one sentence, so
that the leaderboard lists the reason (docs/estimators.md#bergson).
"""

from __future__ import annotations

from estimators.base import Estimator
from estimators.problem import AttributionProblem

REASON = ("bergson cannot run as a tda-bench estimator: it collects gradients of a Hugging "
          "Face PreTrainedModel over a datasets.Dataset of input_ids with its own next-token "
          "loss, not a problem's loss and measurement, and it imports beside CPU torch only "
          "after removing the CUDA-linked torchvision and torchaudio it installs (see "
          "docs/estimators.md#bergson).")


class Bergson(Estimator):
    """Refuses with :data:`REASON` (see module docstring).

    Args:
        **kwargs: none are used; accepted so that overrides do not mask the reason.
    """

    name = "bergson"

    def __init__(self, **kwargs):
        raise ValueError(REASON)

    def score(self, problem: AttributionProblem):  # pragma: no cover - never constructed
        raise ValueError(REASON)
