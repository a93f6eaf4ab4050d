"""The front door: ``kalmanopt.create(name, params, **kw)``."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from kalmanopt.optimizer import OPTIONS, KalmanOptimizer
from kalmanopt.registry import get_preset

__all__ = ["create", "preset_keywords"]

_OPTIMIZER_KEYWORDS = ("loss_statistic", "strict", "track_diagnostics")


def preset_keywords(name: str) -> dict[str, Any]:
    """Every keyword ``create(name, ...)`` accepts, with its default."""
    preset = get_preset(name)
    keywords = {spec.name: spec.default for spec in preset.build().hyperparameters().values()}
    keywords.update(preset.options())
    keywords.update(OPTIONS)
    keywords.update({"loss_statistic": "second_moment", "strict": False, "track_diagnostics": False})
    return keywords


def create(name: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> KalmanOptimizer:
    """Build the preset ``name`` over ``params``.

    Example::

        opt = kalmanopt.create("koala++", model.parameters(), sigma=0.1, q=0.1, lr=1.0, weight_decay=5e-4)

    Raises:
        ValueError: an unknown preset (the message lists the valid ones) or an out-of-range value
            (the message names the parameter and its range).
        TypeError: an unknown keyword (the message lists the valid ones).
    """
    preset = get_preset(name)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in preset.options()}
    composition = preset.build(**options)
    valid = set(composition.hyperparameters()) | set(OPTIONS) | set(_OPTIMIZER_KEYWORDS) | set(preset.options())
    unknown = set(kwargs) - valid
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)} for preset {preset.name!r}; "
                        f"valid keywords: {', '.join(sorted(valid))}")
    return KalmanOptimizer(params, composition, **kwargs)
