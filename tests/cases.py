"""What the behaviour tests run over: every preset with every implementation usable here.

A fast path that lands (or a preset a plugin adds) joins the parametrized tests by itself.
"""

from __future__ import annotations

import torch

import kalmanopt
from kalmanopt.engines import available_implementations

PRESETS = kalmanopt.presets()


def usable_implementations(preset: str) -> list[str]:
    """The implementations that can run ``preset`` on CPU parameters on this machine."""
    opt = kalmanopt.create(preset, [torch.nn.Parameter(torch.zeros(3))])
    return [name for name, why in available_implementations(opt.filter, opt.param_groups[0]).items() if why is None]


#: (preset, implementation) pairs
CASES = [(preset, impl) for preset in PRESETS for impl in usable_implementations(preset)]
