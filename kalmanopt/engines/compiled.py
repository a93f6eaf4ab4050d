"""The parts' batched coefficient functions, compiled by ``torch.compile`` into a few kernels.

Between its two passes a step runs every part's batched coefficient function
(:func:`kalmanopt.contract.run_update_coefficients`): some 100–200 small operations on tensors of shape
``[layers]`` (KOALA++: about 175). On a GPU each is a kernel of a few microseconds, together a
quarter of a GPT-2 step. Compiled, they become a handful of fused kernels, the same arithmetic.

The compiled function is pure: it takes the batch's tensors (reductions, layer and group state, loss,
statistic, η as a tensor, so that a learning-rate schedule does not recompile) and the group's other
hyper-parameters (Python values: torch.compile compiles a float in at its first value and, at a second one,
once more with the value as an input, so two groups with different values compile twice and a schedule over
q, σ or weight decay compiles twice in all; tests/test_compiled_coefficients.py) and returns what the parts
filled. The fused engine uses it on
CUDA (a phase's first call runs eagerly and counts its operations; the second compiles: seconds, once per
process, and a phase of a few operations stays eager; the reference and foreach engines stay eager); anything
it cannot compile falls back to the same functions run eagerly, with one warning. ``CONFIG["enabled"] =
False`` (or ``KALMANOPT_COMPILE_COEFFICIENTS=0`` in the environment) runs them eagerly everywhere.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from kalmanopt.contract import CoefficientStage
from kalmanopt.plan import run_predict_coefficients, run_update_coefficients

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.composition import Composition

__all__ = ["CompiledCoefficients", "static_hyperparameters", "CONFIG", "CODE_CACHE"]

#: ``enabled``: whether the fused engine runs the coefficient functions compiled (on CUDA); the environment
#: variable ``KALMANOPT_COMPILE_COEFFICIENTS=0`` sets it off at import. ``min_operations``: a phase whose
#: functions run fewer tensor operations than this (counted at its first call, which runs eagerly) stays eager:
#: compiling it costs a compilation in every process and saves a few launches (KOALA++'s predict: 3 operations)
CONFIG: dict[str, Any] = {"enabled": os.environ.get("KALMANOPT_COMPILE_COEFFICIENTS", "1").strip().lower()
                          not in ("0", "false", "no", "off"), "min_operations": 16}


class _OperationCount(TorchDispatchMode):
    """Counts the tensor operations run under it (the size of a phase's eager coefficient functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        self.count += 1
        return func(*args, **(kwargs or {}))

#: the fields of a :class:`CoefficientStage` the parts fill, returned by the compiled function
_OUTPUTS = ("coef", "new_layer", "new_group", "gain", "S", "L", "R", "counters", "info", "code", "skip", "ok")


#: group entries the compiled function is not given: η enters as a tensor input (``CoefficientStage.lr``;
#: parts read ``b.eta``, never ``hp["lr"]``). torch.compile guards every value of the dict it is handed, so
#: a schedule's new ``lr`` at the second step would otherwise compile the function once more
_NOT_STATIC = frozenset({"params", "lr"})


def static_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """The group's hyper-parameters a coefficient function may read: plain Python values (no parameters),
    without ``lr`` (an input of its own)."""
    plain = (bool, int, float, str, type(None))

    def is_plain(v: Any) -> bool:
        return isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v))

    return {k: v for k, v in group.items() if k not in _NOT_STATIC and is_plain(v)}


#: the coefficient phases, by name
_PHASES = {"update": run_update_coefficients, "predict": run_predict_coefficients}


def _coefficients(phase: str, composition: Composition, hp: dict[str, Any], diagnostics: bool,
                  red: dict[str, Tensor], layer: dict[str, Tensor], group: dict[str, Tensor], numel: Tensor,
                  loss: Tensor, statistic: Tensor | None, ok: Tensor, skip: Tensor, lr: Tensor) -> tuple:
    """The pure function torch.compile traces: a fresh batch, one phase's coefficients, what they filled."""
    b = CoefficientStage(hp=hp, red=red, layer=layer, group=group, numel=numel, loss=loss, statistic=statistic, ok=ok,
                         skip=skip, diagnostics=diagnostics, lr=lr)
    _PHASES[phase](composition, b)
    return tuple(getattr(b, name) for name in _OUTPUTS)


class CompiledCoefficients:
    """``run_update_coefficients`` and ``run_predict_coefficients`` through ``torch.compile``.

    Args:
        backend: the ``torch.compile`` backend, a name or a callable (``"inductor"`` generates the fused
            kernels; tests use ``"aot_eager"`` or a counting callable to check that the functions trace
            and agree without a compiler).
        fullgraph: refuse graph breaks (tests); by default a part that does not trace runs partly eagerly.
    """

    def __init__(self, backend: str | Callable = "inductor", fullgraph: bool = False) -> None:
        self.backend, self.fullgraph = backend, fullgraph
        self._functions: dict[tuple[str, str], Callable] = {}
        self._failed: dict[str, str] = {}  # by composition
        self._operations: dict[tuple[str, str], int] = {}  # by phase and composition: counted at the first call

    @property
    def failed(self) -> str | None:
        """Why a composition's functions did not compile (the first such failure), or None."""
        return next(iter(self._failed.values()), None)

    def update(self, composition: Composition, b: CoefficientStage) -> CoefficientStage:
        """Fill ``b`` as :func:`run_update_coefficients` does."""
        return self._run("update", composition, b)

    def predict(self, composition: Composition, b: CoefficientStage) -> CoefficientStage:
        """Fill ``b`` as :func:`run_predict_coefficients` does."""
        return self._run("predict", composition, b)

    def _compiled(self, key: tuple[str, str]) -> Callable:
        """The coefficient function compiled for compositions like this one (``key``: the phase and the
        composition).

        torch.compile keeps a bounded number of variants per code object; one code object per kind of
        composition keeps an ablation's many compositions in one process from exhausting it (past the
        bound torch runs the function eagerly).
        """
        compiled = self._functions.get(key)
        if compiled is None:
            function = _coefficients
            fresh = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                                       function.__defaults__, function.__closure__)
            compiled = self._functions[key] = torch.compile(fresh, backend=self.backend, fullgraph=self.fullgraph)
        return compiled

    def _run(self, phase: str, composition: Composition, b: CoefficientStage) -> CoefficientStage:
        eager = _PHASES[phase]
        key = (phase, repr(composition))
        # (a batch that arrives partly filled runs eagerly: the compiled function starts from an empty one)
        if key[1] in self._failed or b.coef or b.new_layer or b.new_group or b.counters:
            return eager(composition, b)
        operations = self._operations.get(key)
        if operations is None:  # the first call: eagerly, counting what compiling would fuse
            with _OperationCount() as counter:
                eager(composition, b)
            self._operations[key] = counter.count
            return b
        if operations < CONFIG["min_operations"]:
            return eager(composition, b)
        compiled = self._compiled(key)
        lr = b.lr
        if lr is None:  # η as a tensor input: a schedule does not recompile (a tensor lr is not read on the host)
            lr = b.hp["lr"]
            lr = (lr.detach().to(device=b.loss.device, dtype=torch.float64).reshape(()) if isinstance(lr, Tensor)
                  else torch.full((), float(lr), dtype=torch.float64, device=b.loss.device))
        group = {k: v for k, v in b.group.items() if isinstance(v, Tensor)}
        try:
            out = compiled(phase, composition, static_hyperparameters(dict(b.hp)), b.diagnostics, b.red, b.layer,
                           group, b.numel, b.loss, b.statistic, b.ok, b.skip, lr)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the same functions, eagerly
            if self.fullgraph or (b.loss.is_cuda and torch.cuda.is_current_stream_capturing()):
                raise
            lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
            self._failed[key[1]] = reason = " ".join(lines[:2])
            name = getattr(composition, "name", "") or key[1]
            warnings.warn(f"kalmanopt: the coefficient functions of {name} did not compile ({reason}); they run "
                          "eagerly (same results, more kernel launches)", RuntimeWarning, stacklevel=4)
            return eager(composition, b)
        for name, value in zip(_OUTPUTS, out):
            setattr(b, name, value)
        return b


#: the coefficient functions compiled so far, shared by every optimizer of the process: a cache of code (one
#: compiled function per kind of composition, a pure function of its declarations), like torch's own
CODE_CACHE = CompiledCoefficients()
