"""Plug-ins: modules that register estimators' helpers, metrics or ground-truth kinds.

A plug-in is an importable module that registers what it defines when imported
(:func:`bench.metrics.register_metric`, :func:`bench.truths.register_truth`). A run loads
the modules named by its ``plugins:`` config value (a list of module names on ``PYTHONPATH``)
and every module an installed package declares under the ``tda_bench.plugins`` entry-point
group; the run's record names the modules it loaded, so the leaderboard loads them too.
Estimators and tasks need no loading: their YAML's ``_target_`` imports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points

ENTRY_POINTS = "tda_bench.plugins"


def load_plugins(names: Iterable[str] = ()) -> list[str]:
    """Imports the plug-in modules ``names`` and the installed entry points.

    Returns:
        the module names given (for the run's record).

    Raises:
        ValueError: a module cannot be imported (one sentence naming it).
    """
    names = [str(n) for n in names or []]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"plugins: cannot import module {name!r} ({err}); put its folder "
                             "on PYTHONPATH or install the package that holds it.") from None
    for point in entry_points(group=ENTRY_POINTS):
        point.load()
    return names
