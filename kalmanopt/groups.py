"""Checking parameter groups: at construction, at ``add_param_group``, on load, and before each step.

``param_groups`` is a public, mutable list of dicts: a scheduler writes ``lr`` there, and so can a
user (``opt.param_groups[0]["lr"] = float("nan")``). The values are checked when a group is
added and again at the start of every ``step``/``update``/``predict`` (:func:`validate_groups`),
so that a bad edit fails with a message naming the group, the value and the valid range before
anything changes, never half-way through a step.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from kalmanopt.options import GROUP_OPTIONS
from kalmanopt.structure import check_structure

__all__ = ["checked_group_values", "validate_groups", "GroupOwner"]


class GroupOwner(Protocol):
    """What the checks read of the optimizer (:class:`~kalmanopt.KalmanOptimizer`)."""

    filter: Any
    specs: Mapping[str, Any]
    param_groups: list[dict[str, Any]]


def checked_group_values(opt: GroupOwner, group: Mapping[str, Any]) -> dict[str, Any]:
    """The normalised hyper-parameters and group options of ``group``; raises if one is invalid.

    numpy scalars and a 1-element tensor ``lr`` come back as Python numbers, numpy bools as bools.

    Raises:
        ValueError: a value out of range, an unknown choice, or a hyper-parameter missing.
        TypeError: a value of the wrong type (a string for a number, a non-bool for a flag).
    """
    values: dict[str, Any] = {}
    for name, spec in opt.specs.items():
        if name not in group:
            raise ValueError(f"the group has no value for the hyper-parameter {name!r}")
        values[name] = spec.check(group[name])
    for name, option in GROUP_OPTIONS.items():
        if name not in group:
            raise ValueError(f"the group has no value for the option {name!r}")
        values[name] = option.check(group[name])
    merged = {**group, **values}
    for part in opt.filter.parts().values():
        part.check_hyperparameters(merged)
    return values


def validate_groups(opt: GroupOwner) -> None:
    """Check every group as a step is about to read it; call it first in ``step``/``update``/``predict``.

    All groups are checked before any is touched: on an error nothing changes (the values stay as
    the user left them, the step is not taken). Values that pass are normalised in place
    (``np.float32(0.1)`` becomes a float), which does not change what they mean.

    Raises:
        ValueError, TypeError: as :func:`checked_group_values`, with the group's index.
    """
    checked = []
    for index, group in enumerate(opt.param_groups):
        try:
            checked.append(checked_group_values(opt, group))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param_groups[{index}]: {exc}; the step was not taken and nothing changed "
                            "(fix the value in opt.param_groups)") from None
    for group, values in zip(opt.param_groups, checked):
        for name, value in values.items():
            if group[name] is not value:
                group[name] = value
    check_structure(opt)  # the state against the groups: granularity, parameters, precision, device
