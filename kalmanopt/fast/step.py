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
from typing import TYPE_CHECKING

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
            norms = torch._foreach_norm(grads, math.inf)
            bad = _nonfinite(torch.stack([n.to(device) for n in norms]))
            code = code | (bad.to(torch.int32) * CODE_GRADIENT)
    return code


def step_on_device(opt: KalmanOptimizer, loss: Tensor, statistic: Tensor | None) -> None:
    """Update for the current gradients, then predict the next step, all masked on the device.

    Every group's implementation must have ``device_step = True`` (the optimizer checks).
    """
    _report_landed(opt)
    groups = opt.param_groups
    impls = [resolve_implementation(opt.filter, group) for group in groups]
    states = [opt._group_state(i) for i in range(len(groups))]
    device = states[0]["R"].device
    first = not opt._predicted
    # one group whose implementation checks its own gradients in its first pass: nothing to add
    folded = len(groups) == 1 and not first and getattr(impls[0], "checks_gradients", False)
    code = _input_code(opt, loss, statistic, device, gradients=not folded)
    if first:
        for index, (group, impl, state) in enumerate(zip(groups, impls, states)):
            impl.predict(opt, group, state, opt._layers(index), ok=((code & CODE_SKIPS) == 0).to(state["R"].device))
            state["predicted"].fill_(True)
    for index, (group, impl, state) in enumerate(zip(groups, impls, states)):
        where = state["R"].device
        code = impl.update(opt, group, state, opt._layers(index), loss.to(where),
                           None if statistic is None else statistic.to(where), code=code.to(where))
    for index, (group, impl, state) in enumerate(zip(groups, impls, states)):
        ok = ((code & CODE_SKIPS) == 0).to(state["R"].device)
        state["steps"].add_(ok.to(torch.int64))
        state["nonfinite_steps"].add_((~ok).to(torch.int64))
        impl.predict(opt, group, state, opt._layers(index), ok=ok)
        state["predicted"].fill_(True)
    opt._predicted = True
    report(opt, code)


def report(opt: KalmanOptimizer, code: Tensor) -> None:
    """Report a step's code: warn at once on the CPU; on CUDA record it for a deferred warning."""
    if code.device.type != "cuda":
        _warn(opt, int(code))
        return
    if torch.cuda.is_current_stream_capturing():
        return  # a graph replay cannot report; the counters still count
    watch = opt.__dict__.get("_nonfinite_watch")
    if watch is None or watch["kinds"].device != code.device:
        watch = {"kinds": torch.zeros((), dtype=torch.int32, device=code.device),
                 "host": torch.zeros((), dtype=torch.int32).pin_memory(), "events": []}
        opt.__dict__["_nonfinite_watch"] = watch
    watch["kinds"].bitwise_or_(code)
    watch["host"].copy_(watch["kinds"], non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    events = watch["events"]
    events.append(event)
    if len(events) > _MAX_PENDING:  # a later copy carries every earlier code
        del events[1:-1]


def _report_landed(opt: KalmanOptimizer) -> None:
    """Warn about non-finite steps whose codes have reached the host."""
    watch = opt.__dict__.get("_nonfinite_watch")
    if not watch or torch.cuda.is_current_stream_capturing():
        return
    events = watch["events"]
    landed = False
    while events and events[0].query():
        events.pop(0)
        landed = True
    if landed:
        _warn(opt, int(watch["host"]))


def _warn(opt: KalmanOptimizer, code: int) -> None:
    for bit, kind in NONFINITE_KINDS:
        if code & bit and kind not in opt._warned:
            opt._warned.add(kind)
            warnings.warn(f"non-finite {kind} at a recent step: that step was skipped and the parameters "
                          f"and filter state are unchanged; this warning is shown once per kind ({kind})",
                          RuntimeWarning, stacklevel=4)
    if code & CODE_NEGATIVE_LOSS:
        opt._warn_once("negative loss", "the loss is negative; the filter's target is L* = 0, so a layer whose "
                       "loss is below it does not move (shift the loss to be >= 0)")
    if code & CODE_OVERFLOW:
        opt._warn_once("overflow", "‖H‖² or the loss of a layer overflows the state precision; the layer was "
                       "skipped (counted in skipped_layers)")
