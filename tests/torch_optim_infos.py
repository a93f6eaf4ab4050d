"""torch's ``OptimizerInfo`` for kalmanopt: one per preset and per engine, for the ported generic tests.

``torch.testing._internal.common_optimizers`` (shipped in the torch wheel; its helpers need
``expecttest``) describes each torch optimizer by an ``OptimizerInfo``: the class, the keyword
configurations to test, the schedulers, the flags it supports and the errors it must raise.
Here each (preset, engine) pair gets one, with:

- ``optim_cls``: a :class:`KalmanOptimizer` subclass that builds the preset and runs the engine
  (``implementation=``), unless the test passes torch's ``foreach=``/``fused=`` flags;
- ``step_requires_closure=True``, as for LBFGS: a Kalman step needs the loss;
- ``supports_complex=False``, ``supports_sparse=False``: the filter is defined over real, dense
  weights (complex parameters and sparse gradients are refused with a ValueError);
- ``supported_impls=()``: the engine is fixed per info; torch's foreach-vs-forloop test compares
  the ``foreach`` info with the reference engine through the ``foreach=`` flag;
- ``not_og_supported_flags``: the group options an older checkpoint may lack.
"""

from __future__ import annotations

from typing import Any

import torch
from cases import CASES
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

import kalmanopt
from kalmanopt.options import GROUP_OPTIONS

#: engines that run on the CPU (the rest need CUDA)
CPU_ENGINES = ("reference", "foreach")


def preset_optimizer(preset: str, engine: str) -> type[kalmanopt.KalmanOptimizer]:
    """A ``KalmanOptimizer`` class for ``preset`` on ``engine``, constructed as ``cls(params, **kwargs)``."""
    build = kalmanopt.get_preset(preset)

    def __init__(self, params: Any, **kwargs: Any) -> None:
        structural = {k: kwargs.pop(k) for k in list(kwargs) if k in build.options()}
        if "foreach" not in kwargs and "fused" not in kwargs:
            kwargs.setdefault("implementation", engine)
        kalmanopt.KalmanOptimizer.__init__(self, params, build.build(**structural), **kwargs)

    name = "".join(part.capitalize() for part in preset.replace("++", "PP").replace("-", " ").split()) + \
        "_" + engine.capitalize()
    return type(name, (kalmanopt.KalmanOptimizer,), {"__init__": __init__, "__module__": __name__,
                                                      "__qualname__": name, "preset": preset, "engine": engine})


def optim_inputs(preset: str):
    """The keyword configurations each generic test runs (torch: ``optim_inputs_func``)."""
    keywords = kalmanopt.preset_keywords(preset)

    def inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
        configs = [
            OptimizerInput(params=None, kwargs={}, desc="default"),
            OptimizerInput(params=None, kwargs={"lr": 0.5}, desc="non-default lr"),
            OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="nonzero weight_decay"),
            OptimizerInput(params=None, kwargs={"r": 1.0}, desc="fixed R"),
            OptimizerInput(params=None, kwargs={"granularity": "global"}, desc="one global filter"),
        ]
        if "q" in keywords:
            configs.append(OptimizerInput(params=None, kwargs={"q": 0.0, "guard": False}, desc="q = 0, no guard"))
        return configs

    return inputs


def error_inputs(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    """Inputs every preset must refuse, with the error (torch: ``optim_error_inputs_func``)."""

    def params() -> list[torch.Tensor]:
        return [torch.empty(3, device=device, dtype=dtype)]

    construction = [
        ({"lr": -0.5}, ValueError, r"'lr' = -0.5 is out of range"),
        ({"lr": float("nan")}, ValueError, r"'lr' = nan is out of range"),
        ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "Tensor lr must be 1-element"),
        ({"weight_decay": -1.0}, ValueError, r"'weight_decay' = -1.0 is out of range"),
        ({"alpha_r": 1.0}, ValueError, r"'alpha_r' = 1.0 is out of range"),
        ({"strict": "false"}, TypeError, "strict must be True or False"),
        ({"foreach": True, "fused": True}, ValueError, "foreach=True and fused=True"),
        ({"implementation": "fast"}, ValueError, "unknown implementation 'fast'"),
        ({"momentum": 0.9}, TypeError, r"unknown keyword\(s\) \['momentum'\]"),
    ]
    inputs = [ErrorOptimizerInput(OptimizerInput(params=params(), kwargs=kwargs, desc=regex),
                                  error_type=error, error_regex=regex) for kwargs, error, regex in construction]
    inputs.append(ErrorOptimizerInput(
        OptimizerInput(params=[torch.empty(3, device=device, dtype=torch.complex64)], kwargs={}, desc="complex"),
        error_type=ValueError, error_regex="does not support complex parameters"))
    inputs.append(ErrorOptimizerInput(
        OptimizerInput(params=[torch.empty(3, device=device, dtype=torch.int64)], kwargs={}, desc="integer"),
        error_type=ValueError, error_regex="needs floating-point parameters"))
    inputs.append(ErrorOptimizerInput(
        OptimizerInput(params=params(), kwargs={}, desc="a step without the loss"),
        error_on=OptimizerErrorEnum.STEP_ERROR, error_type=TypeError, error_regex="step needs the loss"))
    return inputs


def _info(preset: str, engine: str) -> OptimizerInfo:
    info = OptimizerInfo(
        preset_optimizer(preset, engine),
        optim_inputs_func=optim_inputs(preset),
        optim_error_inputs_func=error_inputs,
        supported_impls=(),
        not_og_supported_flags=tuple(GROUP_OPTIONS),
        supports_complex=False,
        supports_sparse=False,
        step_requires_closure=True,
        supports_fused_on=("cuda",) if engine == "fused" else (),
    )
    info.preset, info.engine = preset, engine
    return info


#: (preset, engine) pairs: the CPU ones, and the fused engine wherever foreach runs the preset
PAIRS = list(CASES) + [(preset, "fused") for preset, engine in CASES if engine == "foreach"]

#: one OptimizerInfo per preset and per engine
optim_db: list[OptimizerInfo] = [_info(preset, engine) for preset, engine in PAIRS]


def info_id(info: OptimizerInfo) -> str:
    return f"{info.preset}-{info.engine}"
