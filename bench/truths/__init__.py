"""Ground-truth kinds: LOO, LDS, PBRF, counterfactual removal, proponents, tail-patch,
mislabel detection — each a module of this package registered with
:func:`~bench.truths.base.register_truth`, plus any plug-in (see :mod:`bench.truths.base`)."""

from __future__ import annotations

import importlib
import pkgutil

from bench.truths.base import (
    GroundTruth,
    TruthContext,
    register_truth,
    truth_kinds,
    without_truth_settings,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GroundTruth", "TruthContext", "register_truth", "truth_kinds",
           "without_truth_settings"]
