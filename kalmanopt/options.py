"""The optimizer's options: one table that the constructor, ``create``, the runner and ``kalmanopt list`` read.

Options are the keywords a :class:`~kalmanopt.KalmanOptimizer` takes beside the composition's
hyper-parameters. Each has a type, a default, its valid choices and a sentence of help.
``scope`` says where the value lives: ``"group"`` options are per parameter group (in
``param_groups`` and in checkpoints, like ``lr``), ``"optimizer"`` options are attributes of the
optimizer.

torch.optim's ``foreach=`` and ``fused=`` flags are accepted as aliases of ``implementation=``
(:func:`implementation_from_torch_flags`), so code written for torch.optim ports unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kalmanopt.engines import IMPLEMENTATIONS
from kalmanopt.engines.distributed import AUTO, check_process_group
from kalmanopt.measurement import LOSS_STATISTICS

__all__ = ["Option", "OPTIONS", "GROUP_OPTIONS", "OPTIMIZER_OPTIONS", "GRANULARITIES", "TORCH_FLAGS", "STATE_DTYPES",
           "option_defaults", "implementation_from_torch_flags", "as_bool", "check_state_dtype"]

#: how parameters are grouped into filters
GRANULARITIES = ("layer", "global")

#: torch.optim's implementation flags, accepted as aliases of ``implementation=``
TORCH_FLAGS = ("foreach", "fused")


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool; anything but a bool (or a numpy bool) is a ``TypeError``.

    ``strict="false"`` or ``guard=0`` are refused rather than read by truthiness, which would
    silently turn ``"false"`` into ``True``.
    """
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and getattr(getattr(value, "dtype", None), "kind", "") == "b" \
            and getattr(value, "ndim", None) == 0:
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


#: the precisions per-parameter state may be stored in besides the default (``state_dtype``)
STATE_DTYPES = ("bfloat16",)


def check_state_dtype(value: Any) -> str | None:
    """``state_dtype`` normalised: ``None`` or ``"bfloat16"`` (``torch.bfloat16`` is accepted for it).

    Raises:
        ValueError, TypeError: any other value, naming the valid ones.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
        if name in STATE_DTYPES:
            return name
        raise ValueError(f"unknown state_dtype {value}; valid choices: None, 'bfloat16' (or torch.bfloat16)")
    if not isinstance(value, str):
        raise TypeError(f"state_dtype must be None, 'bfloat16' or torch.bfloat16, got {type(value).__name__} "
                        f"{value!r}")
    if value not in STATE_DTYPES:
        raise ValueError(f"unknown state_dtype {value!r}; valid choices: None, 'bfloat16' (or torch.bfloat16)")
    return value


@dataclass(frozen=True)
class Option:
    """One keyword of the optimizer beside the hyper-parameters.

    Attributes:
        name: the keyword.
        type: ``bool``, ``str``, or ``object`` (an option checked by ``checker``).
        default: the value used when none is given.
        choices: the valid values of a ``str`` option (``None`` included where it is valid).
        scope: ``"group"`` (per parameter group, saved in checkpoints) or ``"optimizer"``.
        doc: one sentence of help, shown by ``kalmanopt list``.
        checker: for an ``object`` option, the function that checks a value and returns it.
        also: for an ``object`` option, what else it takes beside ``choices``, in words.
    """

    name: str
    type: type
    default: Any
    choices: tuple = ()
    scope: str = "group"
    doc: str = ""
    checker: Callable[[Any], Any] | None = None
    #: what an ``object`` option takes beside its choices, in words
    also: str = ""

    def check(self, value: Any) -> Any:
        """``value`` normalised (a numpy bool becomes a bool), or ``TypeError``/``ValueError`` naming the choices."""
        if self.type is bool:
            return as_bool(self.name, value)
        if self.checker is not None:
            return self.checker(value)
        valid = self.describe()
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{self.name} must be one of {valid}, got {type(value).__name__} {value!r}")
        if value not in self.choices:
            raise ValueError(f"unknown {self.name} {value!r}; valid choices: {valid}")
        return value

    def describe(self) -> str:
        """The valid values in words: ``True or False`` or the list of choices."""
        if self.type is bool:
            return "True or False"
        if self.type is object:
            return ", ".join(repr(c) for c in self.choices) + (f" or {self.also}" if self.also else "")
        return ", ".join(str(c) for c in self.choices)


#: every option, by name
OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("loss_statistic", str, "second_moment", LOSS_STATISTICS, "optimizer",
           "the statistic of the per-sample losses that the online R follows: the second moment "
           "mean(l^2) (the authors' image code) or the variance (their language-model code)"),
    Option("strict", bool, False, scope="optimizer",
           doc="raise kalmanopt.NonFiniteError on a non-finite loss, statistic or gradient instead of "
               "skipping the step"),
    Option("track_diagnostics", bool, False, scope="optimizer",
           doc="record per-layer internals (S, the gain scale, ...) each step; opt.diagnostics() returns them"),
    Option("implementation", str, None, IMPLEMENTATIONS + (None,), "group",
           "the arithmetic of a step: 'reference' (per-layer teaching code), 'foreach' (multi-tensor), "
           "'fused' (CUDA kernels) or None (the fastest that runs the group); foreach=/fused= are aliases"),
    Option("guard", bool, True, scope="group",
           doc="the positive-definiteness guard (restart where S_k <= eps R_k, innovation clamped at 0); "
               "False reproduces the released code exactly"),
    Option("granularity", str, "layer", GRANULARITIES, "group",
           "'layer': one filter per parameter tensor (as the authors); 'global': one filter for the whole group"),
    Option("process_group", object, AUTO, (AUTO, None), "optimizer",
           "several processes (DDP, FSDP2): 'auto' sums the loss moments (and sharded layers' reductions) over "
           "the default process group once per step, None opts out, or the ProcessGroup to use",
           check_process_group, also="a torch.distributed.ProcessGroup"),
    Option("state_dtype", object, None, (None, "bfloat16"), "group",
           "the precision the per-parameter filter state is stored in: None (the parameters' precision, at least "
           "float32) or 'bfloat16' (half the memory and traffic; written with stochastic rounding, the arithmetic "
           "stays float32)", check_state_dtype, also="torch.bfloat16"),
)}

#: the per-group options
GROUP_OPTIONS: dict[str, Option] = {n: o for n, o in OPTIONS.items() if o.scope == "group"}
#: the options kept as attributes of the optimizer
OPTIMIZER_OPTIONS: dict[str, Option] = {n: o for n, o in OPTIONS.items() if o.scope == "optimizer"}


def option_defaults(scope: str | None = None) -> dict[str, Any]:
    """Name → default of the options of ``scope`` (``"group"``, ``"optimizer"``, or ``None`` for all)."""
    return {n: o.default for n, o in OPTIONS.items() if scope is None or o.scope == scope}


def implementation_from_torch_flags(implementation: Any, foreach: Any, fused: Any) -> Any:
    """The ``implementation`` that torch's ``foreach``/``fused`` flags ask for.

    ``foreach=True`` → ``"foreach"``; ``fused=True`` → ``"fused"``; ``foreach=False`` (without
    ``fused=True``) → ``"reference"``; ``fused=False`` alone and ``None`` flags leave
    ``implementation`` as it is. Flags that disagree with each other or with an explicit
    ``implementation`` raise ``ValueError``; a flag that is not a bool (or None) is a ``TypeError``.
    """
    flags = {}
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None:
            flags[name] = as_bool(name, value)
    if flags.get("foreach") and flags.get("fused"):
        raise ValueError("foreach=True and fused=True ask for two implementations; give one "
                         "(or implementation='foreach' / 'fused')")
    if flags.get("fused"):
        wanted = "fused"
    elif flags.get("foreach"):
        wanted = "foreach"
    elif flags.get("foreach") is False:
        wanted = "reference"
    else:  # only fused=False, or no flag: no preference
        return implementation
    if implementation is not None and implementation != wanted:
        given = ", ".join(f"{k}={v}" for k, v in flags.items())
        raise ValueError(f"{given} asks for implementation={wanted!r}, but implementation={implementation!r} "
                         "was given too; give one of them")
    return wanted
