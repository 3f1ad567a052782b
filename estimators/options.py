"""Validated argument values: the checks every estimator shares, and the two option groups
every gradient estimator takes.

Estimators keep flat, Hydra-friendly keyword arguments (``estimator.chunk_size=64`` on the
command line, one flat key per value in ``conf/estimator/*.yaml``); on construction the
shared ones become two frozen values, each validated once in ``__post_init__``
(as kronfluence's argument dataclasses):

* :class:`GradientOptions`: which layers' gradients, how many examples at a time, and
  whether layer-wise scores are kept (``modules``, ``chunk_size``, ``per_layer``);
* :class:`ProjectionOptions`: the seeded random projection of those gradients and where
  projected training gradients are stored (``projection_dim``, ``projection_kind``,
  ``projection_seed``, ``projection_structure``, ``index_dir``).

The checks (:func:`positive`, :func:`bounded`, :func:`choice`, :func:`flag`) return the
value in its plain type and raise one sentence that names the config key, e.g.
``chunk_size must be a positive integer, got 0`` or ``damping must be a number, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CURVATURES = ("ggn", "hessian")  # Gauss-Newton or exact Hessian (estimators.explicit)
KINDS = ("rademacher", "gaussian")  # entries of a random projection
STRUCTURES = ("kronecker", "dense")  # how a projection is applied (estimators.projection)


def _null(allow_none: bool) -> str:
    return " or null" if allow_none else ""


def number(name: str, value: Any, *, integer: bool = False, allow_none: bool = False,
           expected: str | None = None) -> float | int | None:
    """``value`` as a float (an int with ``integer``), or None when allowed.

    Booleans, strings and NaN are not numbers; with ``integer``, a float must be integral
    (``1e3`` is accepted as 1000). ``expected`` words the error (default: "a number" or
    "an integer").
    """
    if value is None and allow_none:
        return None
    expected = expected or ("an integer" if integer else "a number")
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or math.isnan(value) or (integer and not float(value).is_integer()):
        raise ValueError(f"{name} must be {expected}{_null(allow_none)}, got {value!r}")
    return int(value) if integer else float(value)


def positive(name: str, value: Any, *, integer: bool = False,
             allow_none: bool = False) -> float | int | None:
    """``value`` > 0 as a float (an int with ``integer``), or None when allowed."""
    expected = "a positive integer" if integer else None
    out = number(name, value, integer=integer, allow_none=allow_none, expected=expected)
    if out is not None and out <= 0:
        raise ValueError(f"{name} must be {expected or 'positive'}{_null(allow_none)}, got "
                         f"{value!r}")
    return out


def bounded(name: str, value: Any, low: float | None = None, high: float | None = None, *,
            allow_none: bool = False) -> float | None:
    """``value`` as a float with ``low`` <= value <= ``high`` (either bound optional)."""
    out = number(name, value, allow_none=allow_none)
    if out is None or ((low is None or out >= low) and (high is None or out <= high)):
        return out
    if high is None:
        rule = f">= {low:g}"
    elif low is None:
        rule = f"<= {high:g}"
    else:
        rule = f"in [{low:g}, {high:g}]"
    raise ValueError(f"{name} must be {rule}{_null(allow_none)}, got {value!r}")


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options``."""
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a boolean (``true``/``false`` in a config; no truthy strings)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class GradientOptions:
    """Which per-example gradients a gradient estimator takes, and how.

    Attributes:
        modules: the tracked linear layers: None (the problem's default, else all), ``all``,
            ``blocks`` (inside the transformer blocks), ``mlp_only``,
            ``all_parameters`` (every parameter: gradient similarity only), or a regular
            expression searched in module names (:func:`~estimators.gradients.tracked_layers`).
        chunk_size: training examples per gradient chunk ``[chunk_size, P]``; bounds memory.
        per_layer: also keep layer-wise scores ``[n_layers, n_queries, n_train]``.
    """

    modules: str | None = None
    chunk_size: int = 256
    per_layer: bool = False

    def __post_init__(self) -> None:
        if self.modules is not None:
            hint = "'all', 'mlp_only' or a regular expression over linear-layer names"
            if not isinstance(self.modules, str):
                raise ValueError(f"modules must be {hint}, got {self.modules!r}")
            try:
                re.compile(self.modules)
            except re.error as err:
                raise ValueError(f"modules must be {hint}; {self.modules!r} is not a valid "
                                 f"regular expression ({err})") from None
        object.__setattr__(self, "chunk_size", positive("chunk_size", self.chunk_size,
                                                        integer=True))
        object.__setattr__(self, "per_layer", flag("per_layer", self.per_layer))


@dataclass(frozen=True)
class ProjectionOptions:
    """The seeded random projection of gradients (:mod:`estimators.projection`).

    Attributes:
        dim: project every gradient to about this many numbers; None keeps exact gradients.
        kind: ``rademacher`` or ``gaussian`` entries.
        seed: the projection's seed.
        structure: ``kronecker`` (per layer, from the factored gradient) or ``dense`` (one
            ``[P, dim]`` matrix over all tracked parameters).
        index_dir: with a projection, the directory where projected training gradients
            ``[n_train, dim]`` are stored once and memory-mapped after; None recomputes them.
    """

    dim: int | None = None
    kind: str = "rademacher"
    seed: int = 0
    structure: str = "kronecker"
    index_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", positive("projection_dim", self.dim, integer=True,
                                                 allow_none=True))
        choice("projection_kind", self.kind, KINDS)
        object.__setattr__(self, "seed", number("projection_seed", self.seed, integer=True))
        choice("projection_structure", self.structure, STRUCTURES)
        if self.index_dir is not None and not isinstance(self.index_dir, str | os.PathLike):
            raise ValueError(f"index_dir must be a directory path or null, got "
                             f"{self.index_dir!r}")

    @property
    def enabled(self) -> bool:
        """Whether gradients are projected at all (``dim`` is set)."""
        return self.dim is not None


class Option:
    """An estimator attribute that reads, and on assignment re-validates, one field of a
    frozen options value held by the estimator (``chunk_size = Option("gradient_options")``
    makes ``estimator.chunk_size`` the config key it was built from).

    Args:
        group: the estimator's attribute holding the options value.
        field: the field's name in it (default: the attribute's own name).
    """

    def __init__(self, group: str, field: str | None = None):
        self.group, self.field = group, field

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = self.field or name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.group), self.field)

    def __set__(self, obj: Any, value: Any) -> None:
        options = getattr(obj, self.group)
        setattr(obj, self.group, dataclasses.replace(options, **{self.field: value}))
