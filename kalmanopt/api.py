"""The front door: ``kalmanopt.create(name, params, **kw)``."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from kalmanopt.composition import Composition
from kalmanopt.hyperparams import as_number
from kalmanopt.optimizer import KalmanOptimizer
from kalmanopt.options import OPTIONS, TORCH_FLAGS, option_defaults
from kalmanopt.registry import get_preset

__all__ = ["create", "preset_keywords", "preset_composition", "observe", "find_kalman_optimizer"]


def preset_keywords(name: str) -> dict[str, Any]:
    """Every keyword ``create(name, ...)`` accepts, with its default."""
    preset = get_preset(name)
    keywords = {spec.name: spec.default for spec in preset.build().hyperparameters().values()}
    keywords.update(preset.options())
    keywords.update(option_defaults())
    return keywords


def create(name: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> KalmanOptimizer:
    """Build the preset ``name`` over ``params``.

    Example::

        opt = kalmanopt.create("koala++", model.parameters(), sigma=0.1, q=0.1, lr=1.0, weight_decay=5e-4)

    torch.optim's ``foreach=True``/``fused=True`` are accepted as ``implementation="foreach"``/
    ``"fused"`` (``foreach=False`` as ``"reference"``); the options are listed, with their types
    and choices, in :data:`kalmanopt.options.OPTIONS`.

    Raises:
        ValueError: an unknown preset (the message lists the valid ones) or an out-of-range value
            (the message names the parameter and its range).
        TypeError: an unknown keyword (the message lists the valid ones).
    """
    composition, kwargs = preset_composition(name, kwargs)
    return KalmanOptimizer(params, composition, **kwargs)


def preset_composition(name: str, kwargs: dict[str, Any]) -> tuple[Composition, dict[str, Any]]:
    """The composition of preset ``name`` built with the structural options in ``kwargs``, and the keywords
    left for :class:`KalmanOptimizer` (hyper-parameters and options); raises as :func:`create`."""
    preset = get_preset(name)
    kwargs = dict(kwargs)
    # structural options (memory=3): numpy scalars read as Python numbers, as the hyper-parameters
    options = {k: as_number(k, kwargs.pop(k)) for k in list(kwargs) if k in preset.options()}
    composition = preset.build(**options)
    valid = set(composition.hyperparameters()) | set(OPTIONS) | set(preset.options())
    unknown = set(kwargs) - valid - set(TORCH_FLAGS)
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)} for preset {preset.name!r}; "
                        f"valid keywords: {', '.join(sorted(valid))} (and torch's foreach=/fused=, "
                        "aliases of implementation=)")
    return composition, kwargs


def find_kalman_optimizer(optimizer: Any) -> Any:
    """The :class:`~kalmanopt.KalmanOptimizer` inside ``optimizer``: itself, or found along its ``.optimizer``
    attributes (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, and any wrapper
    that keeps the optimizer it wraps there).

    Raises:
        TypeError: no KalmanOptimizer along the chain (the message names what was found).
    """
    seen: list[str] = []
    current, visited = optimizer, set()
    while current is not None and id(current) not in visited:
        if isinstance(current, KalmanOptimizer):
            return current
        visited.add(id(current))
        seen.append(type(current).__name__)
        current = getattr(current, "optimizer", None)
    raise TypeError(f"found no kalmanopt optimizer in {' -> '.join(seen) or 'None'} (looked along the .optimizer "
                    "attributes); observe() takes a KalmanOptimizer, e.g. kalmanopt.create(...) or "
                    "kalmanopt.optim.KoalaPP(...), or a wrapper of one")


def observe(optimizer: Any, loss: Any) -> None:
    """Hand one micro-batch's losses to the kalmanopt optimizer in ``optimizer`` for its next ``step()``.

    ``optimizer`` may be the optimizer itself or a wrapper of it (see :func:`find_kalman_optimizer`).
    ``loss``: the per-sample losses (preferred) or their mean; see :mod:`kalmanopt.observation`.
    """
    find_kalman_optimizer(optimizer).observe(loss)
