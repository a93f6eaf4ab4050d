"""A whole ``step`` on the device: no host-device synchronisation, capturable in a CUDA graph.

The reference path checks the loss, the statistic and the gradients on the host and skips a
non-finite step with a branch. Here the check is a device-side code (bit 0: loss, bit 1:
statistic, bit 2: gradient) that masks every change of the step; the warning is deferred: the
code is OR-ed into a device accumulator, copied without blocking to pinned memory, and read on a
later step once the copy has landed (at once on the CPU, where reading costs nothing).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from kalmanopt.fast.support import (
    CODE_GRADIENT,
    CODE_LOSS,
    CODE_NEGATIVE_LOSS,
    CODE_OVERFLOW,
    CODE_SKIPS,
    CODE_STATISTIC,
)
from kalmanopt.implementations import resolve_implementation

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["step_on_device", "report"]

#: the bits of the code that skip a step (see :mod:`kalmanopt.fast.support`), by kind
NONFINITE_KINDS = ((CODE_LOSS, "loss"), (CODE_STATISTIC, "statistic"), (CODE_GRADIENT, "gradient"))

#: at most this many copies of the code are watched at once
_MAX_PENDING = 8


def _nonfinite(t: Tensor) -> Tensor:
    return ~torch.isfinite(t).all()


def _input_code(opt: KalmanOptimizer, loss: Tensor, statistic: Tensor | None, device: torch.device,
                gradients: bool) -> Tensor:
    code = _nonfinite(loss).to(device=device, dtype=torch.int32)
    if statistic is not None:
        code = code | (_nonfinite(statistic).to(device=device, dtype=torch.int32) * CODE_STATISTIC)
    if gradients:
        grads = [g for g in opt._gradients() if g.numel()]  # (an empty tensor has no infinity norm)
        if grads:
            if all(g.device.type == "cpu" for g in grads):
                # min and max carry NaN and ±inf, and are vectorised on the CPU (the ∞-norm is not)
                extremes = torch.stack([x for g in grads for x in torch.aminmax(g.detach())])
                bad = _nonfinite(extremes.to(device))
            else:
                norms = torch._foreach_norm(grads, math.inf)
                bad = _nonfinite(torch.stack([n.to(device) for n in norms]))
            code = code | (bad.to(torch.int32) * CODE_GRADIENT)
    return code


class LazyLayers(Sequence):
    """``opt._layers(index)``, built on first use (the fused path's steady state never needs it)."""

    def __init__(self, opt: KalmanOptimizer, index: int) -> None:
        self._opt, self._index, self._layers = opt, index, None

    def _get(self) -> list:
        if self._layers is None:
            self._layers = self._opt._layers(self._index)
        return self._layers

    def __getitem__(self, i):  # type: ignore[override]
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())


def step_on_device(opt: KalmanOptimizer, loss: Tensor, statistic: Tensor | None) -> None:
    """Update for the current gradients, then predict the next step, all masked on the device.

    Every group's implementation must have ``device_step = True`` (the optimizer checks).
    """
    _report_landed(opt)
    groups = opt.param_groups
    impls = [resolve_implementation(opt.filter, group) for group in groups]
    first = not opt._predicted
    if len(groups) == 1 and not first and getattr(impls[0], "checks_gradients", False):
        # one group whose implementation checks the inputs in its own kernels and counts the step
        state, layers = opt._group_state(0), LazyLayers(opt, 0)
        where = state["R"].device
        code = impls[0].update(opt, groups[0], state, layers, loss.to(where),
                               None if statistic is None else statistic.to(where), code=None, count=True)
        impls[0].predict(opt, groups[0], state, layers, code=code)
        opt._predicted = True
        _publish(opt, code.device)
        return
    states = [opt._group_state(i) for i in range(len(groups))]
    layers = [LazyLayers(opt, i) for i in range(len(groups))]
    device = states[0]["R"].device
    code = _input_code(opt, loss, statistic, device, gradients=True)
    if first:
        for index, (group, impl, state) in enumerate(zip(groups, impls, states)):
            impl.predict(opt, group, state, layers[index], ok=((code & CODE_SKIPS) == 0).to(state["R"].device))
            state["predicted"].fill_(True)
    for index, (group, impl, state) in enumerate(zip(groups, impls, states)):
        where = state["R"].device
        code = impl.update(opt, group, state, layers[index], loss.to(where),
                           None if statistic is None else statistic.to(where), code=code.to(where))
    for index, (group, impl, state) in enumerate(zip(groups, impls, states)):
        ok = ((code & CODE_SKIPS) == 0).to(state["R"].device)
        state["steps"].add_(ok.to(torch.int64))
        state["nonfinite_steps"].add_((~ok).to(torch.int64))
        impl.predict(opt, group, state, layers[index], ok=ok)
        state["predicted"].fill_(True)
    opt._predicted = True
    report(opt, code)


def kinds_accumulator(opt: KalmanOptimizer, device: torch.device) -> Tensor:
    """The device tensor that collects the codes of the steps (OR-ed), for the deferred warning."""
    watch = opt.__dict__.get("_nonfinite_watch")
    if watch is None or watch["kinds"].device != device:
        watch = {"kinds": torch.zeros((), dtype=torch.int32, device=device),
                 "host": torch.zeros((), dtype=torch.int32).pin_memory() if device.type == "cuda"
                 else torch.zeros((), dtype=torch.int32), "events": []}
        opt.__dict__["_nonfinite_watch"] = watch
    return watch["kinds"]


def _publish(opt: KalmanOptimizer, device: torch.device) -> None:
    """Copy the accumulated codes towards the host without blocking; warn later when they land."""
    watch = opt.__dict__["_nonfinite_watch"]
    if device.type != "cuda":
        _warn(opt, int(watch["kinds"]))
        return
    if torch.cuda.is_current_stream_capturing():
        return  # a graph replay cannot report; the counters still count
    watch["host"].copy_(watch["kinds"], non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    events = watch["events"]
    events.append(event)
    if len(events) > _MAX_PENDING:  # a later copy carries every earlier code
        del events[1:-1]


def report(opt: KalmanOptimizer, code: Tensor) -> None:
    """Report a step's code: warn at once on the CPU; on CUDA record it for a deferred warning."""
    if code.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    kinds_accumulator(opt, code.device).bitwise_or_(code)
    _publish(opt, code.device)


def _report_landed(opt: KalmanOptimizer) -> None:
    """Warn about non-finite steps whose codes have reached the host."""
    watch = opt.__dict__.get("_nonfinite_watch")
    if not watch or not watch["events"] or torch.cuda.is_current_stream_capturing():
        return
    events = watch["events"]
    landed = False
    while events and events[0].query():
        events.pop(0)
        landed = True
    if landed:
        _warn(opt, int(watch["host"]))


def _warn(opt: KalmanOptimizer, code: int) -> None:
    new = [kind for bit, kind in NONFINITE_KINDS if code & bit and kind not in opt._warned]
    if new:
        opt._warned.update(new)
        warnings.warn(f"non-finite {' and '.join(new)} at a recent step: that step was skipped and the "
                      "parameters and filter state are unchanged; this warning is shown once per kind "
                      f"({', '.join(new)})", RuntimeWarning, stacklevel=4)
    if code & CODE_NEGATIVE_LOSS:
        opt._warn_once("negative loss", "the loss is negative; the filter's target is L* = 0, so a layer whose "
                       "loss is below it does not move (shift the loss to be >= 0)")
    if code & CODE_OVERFLOW:
        opt._warn_once("overflow", "‖H‖² or the loss of a layer overflows the state precision; the layer was "
                       "skipped (counted in skipped_layers)")
