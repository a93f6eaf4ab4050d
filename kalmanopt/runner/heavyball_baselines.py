"""heavyball's matrix-aware optimizers (SOAP, PSGD and the rest) as runner baselines.

A config names one by its lowercase class name, ``{heavyball = "soap", lr = 3e-3}``; heavyball is imported
only then (the ``baselines`` extra installs it: ``pip install 'kalmanopt[baselines]'``). heavyball compiles
each step with ``torch.compile`` by default, which on a CPU takes minutes of autotuning before the first step;
the runner steps it eagerly instead (``heavyball.utils.compile_mode = None``, for every heavyball optimizer
of the process), so its times are those of its eager step.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from torch.optim import Optimizer

from kalmanopt.runner.errors import ConfigError

__all__ = ["INSTALL", "heavyball_optimizers", "build_heavyball"]

#: how to install heavyball beside kalmanopt
INSTALL = "pip install 'kalmanopt[baselines]' (heavyball)"


def _heavyball() -> Any:
    try:
        import heavyball
        import heavyball.utils
    except ImportError as exc:
        raise ConfigError(f"heavyball baselines need heavyball, which does not import here ({exc}); "
                          f"install it: {INSTALL}") from None
    return heavyball


def heavyball_optimizers() -> dict[str, type[Optimizer]]:
    """heavyball's optimizers by lowercase class name (its abstract bases left out).

    Raises:
        ConfigError: heavyball does not import (saying how to install it).
    """
    heavyball = _heavyball()
    found = {}
    for name in sorted(dir(heavyball), key=str.lower):
        cls = getattr(heavyball, name)
        if isinstance(cls, type) and issubclass(cls, Optimizer) and not inspect.isabstract(cls) \
                and not name.endswith("Base") and name[0].isupper():
            found[name.lower()] = cls
    return found


def build_heavyball(name: str, params: Iterable[Any], keywords: dict[str, Any]) -> Optimizer:
    """heavyball's optimizer ``name`` over ``params`` with ``keywords``, stepping eagerly (module docstring)."""
    cls = heavyball_optimizers()[name]
    _heavyball().utils.compile_mode = None
    return cls(params, **keywords)
