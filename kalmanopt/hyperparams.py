"""Hyper-parameter declarations: a name, a default, a valid range and a sentence of meaning.

Every part of a filter declares the hyper-parameters it reads from a ``param_group``. The optimizer
collects them, fills the defaults, and validates each value against its range, so that a bad
value fails at construction (or at ``add_param_group``) with a message naming the parameter, the
value and the range, and never half-way through a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["HyperParameter", "Range", "validate_hyperparameters", "as_number", "TENSOR_HYPERPARAMETERS"]

#: hyper-parameters that may also be given as a 1-element tensor (as torch.optim accepts a tensor lr)
TENSOR_HYPERPARAMETERS = ("lr",)


def as_number(name: str, value: Any) -> Any:
    """``value`` as a Python number where it is one in another form, else ``value`` unchanged.

    numpy scalars (``np.float32(0.1)``, ``np.int64(3)``) become Python numbers, as torch.optim
    accepts them; for the names in :data:`TENSOR_HYPERPARAMETERS` a 1-element real tensor becomes
    a float (the engines take the step size on the host), and any other tensor is a ``ValueError``.
    Everything else (``None``, strings, bools) is returned as is, for :meth:`HyperParameter.check`.
    """
    if isinstance(value, bool) or value is None:
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        item = value.item()
        return item if isinstance(item, (int, float)) and not isinstance(item, bool) else value
    if name in TENSOR_HYPERPARAMETERS and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"Tensor {name} must be real, got dtype {value.dtype}")
        return float(value.detach().reshape(()).item())
    return value


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of real numbers, optionally admitting ``None``.

    Args:
        low: lower bound (``-inf`` for none).
        high: upper bound (``inf`` for none).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        allow_none: accept ``None`` (e.g. ``r=None`` selects the online estimate of R).
        integer: require a whole number.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    allow_none: bool = False
    integer: bool = False

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in the range."""
        if value is None:
            return self.allow_none
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and (not float(value).is_integer()):
            return False
        if not math.isfinite(value):  # NaN and ±inf are never valid settings
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The range in interval notation, e.g. ``[0, 1)`` or ``(0, inf) or None``."""
        left = "(" if self.low_open or self.low == -math.inf else "["
        right = ")" if self.high_open or self.high == math.inf else "]"
        low = "-inf" if self.low == -math.inf else f"{self.low:g}"
        high = "inf" if self.high == math.inf else f"{self.high:g}"
        text = f"{left}{low}, {high}{right}"
        if self.integer:
            text = "an integer in " + text
        if self.allow_none:
            text += " or None"
        return text


NON_NEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)
UNIT_OPEN_RIGHT = Range(0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class HyperParameter:
    """One hyper-parameter a part reads from ``param_groups``.

    Args:
        name: the keyword (the authors' name where one exists).
        default: the value used when the user gives none.
        valid: the admissible range.
        doc: one sentence of meaning, shown by ``kalmanopt list``.
    """

    name: str
    default: Any
    valid: Range = NON_NEGATIVE
    doc: str = ""

    def check(self, value: Any) -> Any:
        """``value`` as a Python number (see :func:`as_number`), or ``ValueError`` if it is out of range.

        A non-number (a string, a bool, a tensor other than a 1-element ``lr``) is a ``TypeError``.
        """
        value = as_number(self.name, value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(
                f"hyper-parameter {self.name!r} must be a number, got {type(value).__name__} "
                f"{value!r}; valid range: {self.valid.describe()}"
            )
        if not self.valid.contains(value):
            raise ValueError(
                f"hyper-parameter {self.name!r} = {value!r} is out of range; "
                f"valid range: {self.valid.describe()}"
            )
        return value


def validate_hyperparameters(
    specs: Mapping[str, HyperParameter],
    values: Mapping[str, Any],
    extra_checks: tuple[Callable[[Mapping[str, Any]], None], ...] = (),
) -> None:
    """Validate every declared hyper-parameter present in ``values``."""
    for name, spec in specs.items():
        if name in values:
            spec.check(values[name])
    for check in extra_checks:
        check(values)
