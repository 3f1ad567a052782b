"""Validated argument values: the checks every estimator, task and ground-truth kind shares,
the two option groups every gradient estimator takes, and the one error type that names a bad
argument in the caller's terms.

Estimators keep flat, Hydra-friendly keyword arguments (``estimator.chunk_size=64`` on the
command line, one flat key per value in ``conf/estimator/*.yaml``); on construction the
shared ones become two frozen values, each validated once in ``__post_init__``
(as kronfluence's argument dataclasses):

* :class:`GradientOptions`: which layers' gradients, how many examples at a time, and
  whether layer-wise scores are kept (``modules``, ``chunk_size``, ``per_layer``);
* :class:`ProjectionOptions`: the seeded random projection of those gradients and where
  projected training gradients are stored (``projection_dim``, ``projection_kind``,
  ``projection_seed``, ``projection_structure``, ``index_dir``).

The checks (:func:`number`, :func:`positive`, :func:`natural`, :func:`bounded`,
:func:`choice`, :func:`flag`) return the value in its plain type and raise an
:class:`OptionError`: one sentence that names the argument, worded for whoever called.
Raised from Python it reads ``EKFAC: damping must be a number or None, got 'abc'`` and
advises ``EKFAC(fisher="empirical")``; the command line (:meth:`OptionError.in_config`)
reads ``estimator.damping must be a number or null, got 'abc'`` and advises
``estimator.fisher=empirical``. The owner and the config prefix are filled in where the
error leaves a class that :func:`names_arguments` wraps (every estimator, task and
ground-truth kind).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CURVATURES = ("ggn", "hessian")  # Gauss-Newton or exact Hessian (estimators.explicit)
KINDS = ("rademacher", "gaussian")  # entries of a random projection
STRUCTURES = ("kronecker", "dense", "sparse")  # how a projection is applied (estimators.projection)


# An argument reference in an OptionError template: {name} or {name=value}; {{ and }} are
# literal braces.
_REFERENCE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][\w.]*)(?:=([^{}]*))?\}")
_CONSTANTS = {"null": ("None", "null"), "true": ("True", "true"), "false": ("False", "false")}


class OptionError(ValueError):
    """A bad argument value, in the caller's terms (see the module docstring).

    Args:
        template: the sentence, with ``{name}`` for an argument, ``{name=value}`` for a
            setting to suggest (the value spelled as in a config: ``empirical``, ``0.01``,
            ``null``), ``{null}``/``{true}``/``{false}`` for constants; other braces doubled.
        owner: the class the arguments belong to (``EKFAC``); None until the error leaves
            a class wrapped by :func:`names_arguments`.
        scope: the config prefix of the arguments (``estimator``, ``task``, ``task.lds``,
            ``ground_truth``; ``""`` for top-level keys).
    """

    def __init__(self, template: str, owner: str | None = None, scope: str | None = None):
        super().__init__(template)
        self.template, self.owner, self.scope = template, owner, scope

    def __str__(self) -> str:
        body = self._render(python=True)
        return f"{self.owner}: {body}" if self.owner else body

    def in_config(self) -> str:
        """The sentence in config keys (``estimator.damping``, ``estimator.fisher=empirical``)."""
        return self._render(python=False)

    def _render(self, python: bool) -> str:
        def reference(match: re.Match) -> str:
            text, name, value = match.group(0), match.group(1), match.group(2)
            if text in ("{{", "}}"):
                return text[0]
            if name in _CONSTANTS and value is None:
                return _CONSTANTS[name][0 if python else 1]
            if python:
                if value is None:
                    return name
                call = f"{name}={_python_literal(value)}"
                return f"{self.owner}({call})" if self.owner else call
            key = f"{self.scope}.{name}" if self.scope else name
            return key if value is None else f"{key}={value}"

        return _REFERENCE.sub(reference, self.template)


def _python_literal(text: str) -> str:
    """A config spelling (``empirical``, ``0.01``, ``null``) as a Python literal."""
    if text in _CONSTANTS:
        return _CONSTANTS[text][0]
    try:
        float(text)
        return text
    except ValueError:
        return json.dumps(text)


def escape(text: str) -> str:
    """``text`` with its braces doubled, for an :class:`OptionError` template."""
    return str(text).replace("{", "{{").replace("}", "}}")


def literal(value: Any) -> str:
    """``repr(value)`` escaped for an :class:`OptionError` template."""
    return escape(repr(value))


@contextmanager
def arguments_of(owner: str, scope: str) -> Iterator[None]:
    """Gives an :class:`OptionError` raised inside, with no owner yet, this owner and scope."""
    try:
        yield
    except OptionError as err:
        if err.owner is None:
            err.owner, err.scope = owner, scope if err.scope is None else err.scope
        raise


def names_arguments(cls: type, scope: str,
                    methods: Sequence[str] = ("__init__",)) -> type:
    """Wraps ``methods`` defined by ``cls`` so that an :class:`OptionError` leaving them names
    the instance's class and the config prefix ``scope``. Returns ``cls``."""
    for name in methods:
        method = cls.__dict__.get(name)
        if method is None or getattr(method, "_names_arguments", False):
            continue
        setattr(cls, name, _attributed(method, scope))
    return cls


def _attributed(method: Callable, scope: str) -> Callable:
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with arguments_of(type(self).__name__, scope):
            return method(self, *args, **kwargs)

    wrapper._names_arguments = True
    return wrapper


def _null(allow_none: bool) -> str:
    return " or {null}" if allow_none else ""


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
        raise OptionError(f"{{{name}}} must be {expected}{_null(allow_none)}, got "
                          f"{literal(value)}")
    return int(value) if integer else float(value)


def positive(name: str, value: Any, *, integer: bool = False,
             allow_none: bool = False) -> float | int | None:
    """``value`` > 0 as a float (an int with ``integer``), or None when allowed."""
    expected = "a positive integer" if integer else None
    out = number(name, value, integer=integer, allow_none=allow_none, expected=expected)
    if out is not None and out <= 0:
        raise OptionError(f"{{{name}}} must be {expected or 'positive'}{_null(allow_none)}, "
                          f"got {literal(value)}")
    return out


def natural(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """``value`` as a non-negative integer (a seed, a count that may be 0), or None when
    allowed."""
    expected = "a non-negative integer"
    out = number(name, value, integer=True, allow_none=allow_none, expected=expected)
    if out is not None and out < 0:
        raise OptionError(f"{{{name}}} must be {expected}{_null(allow_none)}, got "
                          f"{literal(value)}")
    return out


def bounded(name: str, value: Any, low: float | None = None, high: float | None = None, *,
            allow_none: bool = False, open_low: bool = False,
            open_high: bool = False) -> float | None:
    """``value`` as a float with ``low`` <= value <= ``high`` (either bound optional; with
    ``open_low``/``open_high`` that bound is excluded)."""
    out = number(name, value, allow_none=allow_none)
    if out is None:
        return out
    above = low is None or (out > low if open_low else out >= low)
    below = high is None or (out < high if open_high else out <= high)
    if above and below:
        return out
    if high is None:
        rule = f"{'>' if open_low else '>='} {low:g}"
    elif low is None:
        rule = f"{'<' if open_high else '<='} {high:g}"
    else:
        rule = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    raise OptionError(f"{{{name}}} must be {rule}{_null(allow_none)}, got {literal(value)}")


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options``."""
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]
        raise OptionError(f"{{{name}}} must be {listed}, got {literal(value)}")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a boolean (``true``/``false`` in a config; no truthy strings)."""
    if not isinstance(value, bool):
        raise OptionError(f"{{{name}}} must be {{true}} or {{false}}, got {literal(value)}")
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
                raise OptionError(f"{{modules}} must be {hint}, got {literal(self.modules)}")
            try:
                re.compile(self.modules)
            except re.error as err:
                raise OptionError(f"{{modules}} must be {hint}; {literal(self.modules)} is not "
                                  f"a valid regular expression ({escape(err)})"
                                  ) from None
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
        structure: ``kronecker`` (per layer, from the factored gradient), ``dense`` (one
            ``[P, dim]`` matrix over all tracked parameters) or ``sparse`` (CountSketch: one
            seeded bucket and sign per parameter).
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
        object.__setattr__(self, "seed", natural("projection_seed", self.seed))
        choice("projection_structure", self.structure, STRUCTURES)
        if self.index_dir is not None and not isinstance(self.index_dir, str | os.PathLike):
            raise OptionError(f"{{index_dir}} must be a directory path or {{null}}, got "
                              f"{literal(self.index_dir)}")

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
