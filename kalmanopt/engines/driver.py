"""The step driver: one place for the phases of a step, the non-finite policy, counters and warnings.

For every engine, an update is::

    pass 1     engine.reduce_update(group)          per-layer sums, for every group
    sync       distributed.synchronize_update       several processes: ONE all-reduce of the loss
                                                    moments and the sharded layers' sums
    check      the step's code: a non-finite loss, statistic or gradient skips the whole step
    batched    engine.update_coefficients(batch)    every part's coefficients, all layers at once
    pass 2     engine.apply_update(group, batch)    element-wise programs, state, counters

with a structured surrogate's matrix stages (:mod:`kalmanopt.engines.matrix_stages`) before pass 1 and
after pass 2, and a predict the same with the dynamics' reductions and program. A skipped step changes nothing.
On an engine with ``device_step`` the check is a device mask, and the warning is deferred: the code is
OR-ed into a device accumulator, copied without blocking to pinned memory and read on a later step
once the copy has landed (at once on the CPU, where reading costs nothing).

The entry points of a whole step (``step()``, ``update()``) are in :mod:`kalmanopt.engines.step`,
which tries a replayed CUDA graph (:mod:`kalmanopt.engines.graphs`) before the phases here. Everything
a step remembers for the next one lives on the optimizer's :class:`~kalmanopt.engines.runtime.Runtime`.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from kalmanopt.contract import (
    CODE_GRADIENT,
    CODE_LOSS,
    CODE_NEGATIVE_LOSS,
    CODE_OVERFLOW,
    CODE_SCALER,
    CODE_SKIPS,
    CODE_STATISTIC,
    CODE_STEP_OVERFLOW,
    STEP_COEFFICIENT,
    CoefficientStage,
)
from kalmanopt.engines import distributed, matrix_stages
from kalmanopt.engines.runtime import OptimizerView
from kalmanopt.engines.selection import resolve_engine
from kalmanopt.engines.torch_ops import GroupContext

__all__ = ["run_predict", "run_update", "NONFINITE_KINDS", "NonFiniteError", "MESSAGES", "report",
           "report_landed", "input_code", "grad_scaler_code", "predict_if_due_then_update", "no_gradient",
           "strict_check", "group_contexts", "engine_for"]

#: the bits of the code that skip a step, by kind
NONFINITE_KINDS = ((CODE_LOSS, "loss"), (CODE_STATISTIC, "statistic"), (CODE_GRADIENT, "gradient"))

#: the warning texts, by event
MESSAGES = {
    "nonfinite": ("non-finite {kinds} at {when}: the step was skipped and the parameters and filter state are "
                  "unchanged"),
    "negative loss": ("the loss is negative while the filter's target is L* = 0 (or below a target set with "
                      "target=), so a layer whose loss is below it does not move; for a loss that can be "
                      "negative (a Gaussian negative log-likelihood, a log-density) set target= at or below its "
                      "minimum (docs/reliability.md)"),
    "overflow": "‖H‖² or the loss of a layer overflows the state precision; the layer was skipped (counted in "
                "skipped_layers)",
    "step overflow": ("the step η·L·K of a layer overflows the state precision (a measurement noise R on its "
                      "floor, 1e-38 in float32, makes the gain 1/S huge); that layer's parameters did not move, its "
                      "covariance took the posterior"),
    "no gradient": ("{call} found no gradient: no parameter has a .grad (was loss.backward() called before it?); "
                    "the step was skipped and nothing changed, no counter included"),
    "update without predict": ("update() without predict(): the predict of {name!r} moves the parameters "
                               "(θ̂_k = θ_{{k-1}} + u), so the gradient must be taken after it; call opt.predict() "
                               "before the forward and backward pass (or use step()). Nothing changed"),
}

#: at most this many copies of the code are watched at once
_MAX_PENDING = 8


class NonFiniteError(FloatingPointError):
    """A non-finite loss, statistic or gradient reached an optimizer built with ``strict=True``."""


def engine_for(opt: OptimizerView, index: int, group: dict[str, Any]) -> Any:
    """The engine of group ``index``, resolved once while the group's structure stays (kept in the runtime)."""
    params = group["params"]
    key = (group.get("implementation"), group.get("granularity"), len(params),
           str(params[0].device) if params else None, os.environ.get("TRITON_INTERPRET", "0"))
    kept = opt.runtime.group(index, group)
    found = kept.verdicts.get(key)
    if found is None or found[0] is not params:
        kept.verdicts.clear()
        found = kept.verdicts[key] = (params, resolve_engine(opt.filter, group))
    return found[1]


def group_contexts(opt: OptimizerView, ride_predict: bool = False,
                   ridden: bool = False) -> list[tuple[Any, GroupContext]]:
    """Every group's engine and context for one phase."""
    out = []
    for index, group in enumerate(opt.param_groups):
        ctx = GroupContext(opt.filter, group, opt.group_state(index), functools.partial(opt.layers, index),
                           diagnostics=opt.track_diagnostics, state=opt.state, runtime=opt.runtime, index=index,
                           ride_predict=ride_predict, ridden=ridden)
        out.append((engine_for(opt, index, group), ctx))
    return out


def _device(opt: OptimizerView) -> torch.device:
    """Where the step's code lives: the device of the first group's state (its first parameter's)."""
    for group in opt.param_groups:
        if group["params"]:
            return group["params"][0].device
    return torch.device("cpu")


def strict_check(opt: OptimizerView, loss: Tensor, statistic: Tensor | None) -> None:
    """``strict=True``: raise on non-finite input before anything (state included) is created or changed."""
    if opt.strict:
        code = int(input_code(opt, loss, statistic, torch.device("cpu")))
        if code & CODE_SKIPS:
            raise NonFiniteError(_nonfinite_message(code, "this step") + " (strict=True)")


def _all_finite(t: Tensor) -> Tensor:
    return torch.isfinite(t).all()


def _inputs_code(opt: OptimizerView, loss: Tensor, statistic: Tensor | None, nonfinite: Sequence[Tensor],
                 device: torch.device) -> Tensor:
    """The bits of the update's inputs that are not finite, a 0-d int32 tensor on ``device``: the loss, the
    statistic, and the gradients as the groups' ``nonfinite`` sums measured them (per layer the sum of g·0:
    0, or NaN where a gradient is not). One check of at most three values: a few kernels, however many
    groups and layers (a captured step launches each of them at every replay)."""
    values, bits = [loss.reshape(())], [CODE_LOSS]
    if statistic is not None:
        values.append(statistic.reshape(()))
        bits.append(CODE_STATISTIC)
    sums = [x.reshape(-1) for x in nonfinite if x.numel()]
    if sums:
        values.append((sums[0] if len(sums) == 1 else torch.cat(sums)).sum())  # (0 or NaN: no overflow)
        bits.append(CODE_GRADIENT)
    checked = torch.stack([v.to(device) for v in values])  # (in the widest of their dtypes)
    bad = (checked * 0) != 0  # ±inf · 0 and NaN · 0 are NaN
    return torch.where(bad, opt.runtime.code_bits(bits, device), 0).sum(dtype=torch.int32)


def input_code(opt: OptimizerView, loss: Tensor, statistic: Tensor | None, device: torch.device) -> Tensor:
    """The code of the step's inputs (loss, statistic, gradients), a 0-d int32 tensor on ``device``.

    A separate pass over the gradients: used where no update has measured them yet (the first step).
    Over several processes it is 0: a rank sees only its own loss, so the first predict runs on every
    rank alike (it reads θ and the state only, which a skipped step leaves as they were) and the
    update's synchronised inputs decide.
    """
    if distributed.process_group(opt) is not None:
        return torch.zeros((), dtype=torch.int32, device=device)
    code = (~_all_finite(loss)).to(device=device, dtype=torch.int32) * CODE_LOSS
    if statistic is not None:
        code = code | (~_all_finite(statistic)).to(device=device, dtype=torch.int32) * CODE_STATISTIC
    grads = [g.detach() for g in opt.gradients() if g.numel()]
    if grads:
        if all(g.device.type == "cpu" for g in grads):
            # min and max carry NaN and ±inf, and are vectorised on the CPU (the ∞-norm is not)
            extremes = torch.stack([x for g in grads for x in torch.aminmax(g)])
            bad = ~_all_finite(extremes.to(device))
        else:
            norms = torch._foreach_norm(grads, math.inf)
            bad = ~_all_finite(torch.stack([n.to(device) for n in norms]))
        code = code | bad.to(torch.int32) * CODE_GRADIENT
    return code


@torch.compiler.disable
def run_predict(opt: OptimizerView, ok: Tensor | None, ridden: bool = False) -> None:
    """The predict phase of every group, masked by ``ok`` (a 0-d bool tensor; None: unmasked).

    ``ridden``: it follows an update run with ``ride_predict`` (an engine may have moved the state already).
    """
    if ok is not None and ok.device.type == "cpu" and not bool(ok):
        return  # (free to read on the CPU: a skipped step creates no state either)
    contexts = group_contexts(opt, ridden=ridden)
    works = [engine.reduce_predict(ctx) for engine, ctx in contexts]
    distributed.synchronize_predict(opt, works)  # sharded layers: their sums over the ranks
    for (engine, ctx), (work, red, numel) in zip(contexts, works):
        like = ctx.group_state["R"]
        n = int(numel.numel())
        mask = torch.ones((), dtype=torch.bool, device=like.device) if ok is None else ok.to(like.device)
        b = CoefficientStage(hp=ctx.group, red=red, layer={}, group=ctx.group_state, numel=numel,
                             loss=like.new_zeros(()),
                             statistic=None, ok=mask, skip=(~mask).expand(n))
        engine.predict_coefficients(ctx.composition, b)
        engine.apply_predict(work, b)
        _drop_empty_global(ctx.group_state)
        ctx.group_state["predicted"].logical_or_(mask)
    opt.runtime.predicted = True


def run_update(opt: OptimizerView, loss: Tensor, statistic: Tensor | None, code: Tensor | None = None,
               lr: Sequence[Tensor] | None = None, ride_predict: bool = False) -> Tensor:
    """The update phase of every group; returns the step's code (see :mod:`kalmanopt.contract`).

    ``code``: bits already known to skip the step (the first step's input check), or None. ``lr``: each
    group's η_k as a 0-d device tensor (what a replayed CUDA graph reads), or None (the groups' ``lr``).
    ``ride_predict``: ``run_predict(..., ridden=True)`` follows at once (``step()``).
    """
    contexts = group_contexts(opt, ride_predict=ride_predict)
    device = _device(opt)
    works = []
    staged = []
    for engine, ctx in contexts:
        # a structured surrogate's matrix stages first: the workspace vectors the passes read
        staged.append(matrix_stages.run_before(ctx.composition, ctx.group, ctx.group_state, ctx.layers, ctx.runtime,
                                               ctx.index, ctx.diagnostics)
                      if matrix_stages.has_stages(ctx.composition, ctx.group, ctx.runtime) else None)
        works.append(engine.reduce_update(ctx))
    # several processes: the global batch's loss and statistic, the sharded layers' sums (one all-reduce)
    loss, statistic = distributed.synchronize_update(opt, loss, statistic, works)
    # the step's inputs: a loss, statistic or gradient that is not finite skips the whole step (every group)
    step_code = _inputs_code(opt, loss, statistic, [red["nonfinite"] for _, red, _, _ in works], device)
    scaler_skip = kept = None  # (no bits known before: no scaler's skip either)
    if code is not None:
        step_code = step_code | code.to(device)
        # a loss scaler's overflow (GradScaler's found_inf) explains the gradient's inf: the scaler's own skip,
        # neither counted as non-finite input nor warned about
        scaler_skip = (step_code & CODE_SCALER) != 0
        kept = ~(scaler_skip.to(torch.int32) * CODE_GRADIENT)  # every bit but the gradient's, where it skips
        step_code = step_code & kept
    if opt.strict and bool(step_code & CODE_SKIPS & ~CODE_SCALER):
        raise NonFiniteError(_nonfinite_message(int(step_code), "this step") + " (strict=True)")
    ok = (step_code & CODE_SKIPS) == 0 if code is not None else step_code == 0  # (input bits all skip)
    batches = []
    for index, ((engine, ctx), (_, red, layer, numel)) in enumerate(zip(contexts, works)):
        like = ctx.group_state["R"]
        stat = None if statistic is None else statistic.to(like).reshape(())
        b = CoefficientStage(hp=ctx.group, red=red, layer=layer, group=ctx.group_state, numel=numel,
                             loss=loss.to(like).reshape(()), statistic=stat,
                             ok=ok.to(like.device),
                             skip=torch.zeros(int(numel.numel()), dtype=torch.bool, device=like.device),
                             diagnostics=ctx.diagnostics, lr=None if lr is None else lr[index])
        if ctx.group.get("r", 0.0) is None and statistic is None:
            raise ValueError("r is None (online noise estimate) but no loss statistic was given")
        engine.update_coefficients(ctx.composition, b)
        batches.append(b)
    for (engine, ctx), (work, _, _, _), b, group_stages in zip(contexts, works, batches, staged):
        engine.apply_update(work, b)
        matrix_stages.run_after(group_stages, b)  # the factors' posterior, where a layer took the update
        _drop_empty_global(ctx.group_state)
        state = ctx.group_state
        skipped = ~b.ok
        state["steps"].add_(b.ok)
        state["nonfinite_steps"].add_(skipped if scaler_skip is None else skipped & ~scaler_skip.to(b.ok.device))
        state["predicted"].logical_and_(skipped)  # (an applied update leaves no predict standing)
        step_code = step_code | b.code.to(device)
    if kept is not None:
        step_code = step_code & kept  # (the parts' own gradient check too)
    if opt.track_diagnostics:
        _record(opt, works, batches)
    return step_code


def _drop_empty_global(group_state: dict) -> None:
    """A global layer that holds no state yet (its first update was skipped) leaves no entry."""
    if "global" in group_state and not group_state["global"]:
        del group_state["global"]


def grad_scaler_code(opt: OptimizerView) -> Tensor | None:
    """torch's ``GradScaler`` protocol for optimizers that handle the scale themselves.

    ``GradScaler.step`` sets ``opt.grad_scale`` (the scale the gradients still carry, or None once
    ``unscale_`` ran) and ``opt.found_inf`` (non-zero where a gradient overflowed) for the duration of
    ``step``. The gradients are unscaled in place (as ``unscale_`` would) and the step's code gets
    ``CODE_SCALER`` where ``found_inf`` is set: the step is skipped on the device, with no host
    synchronisation, and — as when the scaler skips a step itself — not counted as non-finite input
    nor warned about. None when neither attribute is set.
    """
    scale, found = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    if scale is None and found is None:
        return None
    device = _device(opt)
    if scale is not None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in opt.gradients():
            if g.numel():
                by_device.setdefault(g.device, []).append(g)
        for where, grads in by_device.items():
            # 1 / scale in float32 (as the scaler's own unscale_): for fp16 gradients it would be subnormal
            inverse = torch.as_tensor(scale, device=where).reshape(()).to(torch.float32).reciprocal()
            torch._foreach_mul_(grads, inverse)
    if found is None:
        return torch.zeros((), dtype=torch.int32, device=device)
    return (torch.as_tensor(found, device=device) != 0).to(torch.int32) * CODE_SCALER


def predict_if_due_then_update(opt: OptimizerView, loss: Tensor, statistic: Tensor | None,
                                extra: Tensor | None = None, ride_predict: bool = False) -> Tensor:
    """The update, after the predict it needs where none has run yet (masked by the step's inputs).

    ``extra``: bits already known to skip the step (``GradScaler``'s ``found_inf``), or None.
    ``ride_predict``: the next predict follows the update at once (see :func:`run_update`).
    """
    code = extra
    if not opt.runtime.predicted:
        code = input_code(opt, loss, statistic, _device(opt))
        if extra is not None:
            code = code | extra
        run_predict(opt, (code & CODE_SKIPS) == 0)
    return run_update(opt, loss, statistic, code, ride_predict=ride_predict)


def no_gradient(opt: OptimizerView, call: str) -> bool:
    """Whether no parameter has a gradient (backward forgotten); if so, warn once. Nothing is changed."""
    if opt.gradients():
        return False
    if distributed.process_group(opt) is not None:
        return False  # several processes: every rank takes part in the step's all-reduce (engines/ranks.py)
    opt.runtime.warn_once("no gradient", MESSAGES["no gradient"].format(call=call))
    return True


def _nonfinite_message(code: int, when: str) -> str:
    kinds = [kind for bit, kind in NONFINITE_KINDS if code & bit]
    return MESSAGES["nonfinite"].format(kinds=" and ".join(kinds), when=when)


def report(opt: OptimizerView, code: Tensor) -> None:
    """Report a step's code: warn at once on the CPU; on CUDA record it for a deferred warning."""
    if code.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # a graph replay cannot report; the counters still count
    watch = opt.runtime.watch_on(code.device)
    watch.kinds.bitwise_or_(code)
    if code.device.type != "cuda":
        _warn(opt, int(watch.kinds))
        watch.kinds.zero_()
        return
    watch.host.copy_(watch.kinds, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    watch.events.append(event)
    if len(watch.events) > _MAX_PENDING:  # a later copy carries every earlier code
        del watch.events[1:-1]


def report_landed(opt: OptimizerView) -> None:
    """Warn about the steps whose codes have reached the host."""
    watch = opt.runtime.watch
    if watch is None or not watch.events or torch.cuda.is_current_stream_capturing():
        return
    landed = False
    while watch.events and watch.events[0].query():
        watch.events.pop(0)
        landed = True
    if landed:
        _warn(opt, int(watch.host))


def _warn(opt: OptimizerView, code: int) -> None:
    warned = opt.runtime.warned
    new = [kind for bit, kind in NONFINITE_KINDS if code & bit and kind not in warned]
    if new:
        warned.update(new)
        warnings.warn(_nonfinite_message(code & CODE_SKIPS, "a recent step" if code else "this step")
                      + f"; this warning is shown once per kind ({', '.join(new)})", RuntimeWarning, stacklevel=4)
    if code & CODE_NEGATIVE_LOSS:
        opt.runtime.warn_once("negative loss", MESSAGES["negative loss"])
    if code & CODE_OVERFLOW:
        opt.runtime.warn_once("overflow", MESSAGES["overflow"])
    if code & CODE_STEP_OVERFLOW:
        opt.runtime.warn_once("step overflow", MESSAGES["step overflow"])


def _record(opt: OptimizerView, works: list, batches: list[CoefficientStage]) -> None:
    """The last update's per-layer internals (device tensors; ``diagnostics()`` reads them)."""
    out: dict[str, dict[str, Tensor]] = {}
    for (work, _, _, _), b in zip(works, batches):
        per_layer = work.extra.get("diagnostics")  # (a surrogate written per layer records its own)
        for i, f in enumerate(work.flats):
            if per_layer is not None:
                if i in per_layer:
                    out[f.layer.name] = {k: torch.as_tensor(v).detach() for k, v in per_layer[i].items()}
                continue
            if b.S is None or bool(b.skip[i]):
                continue
            entry = {"S": b.S[i].detach(), "gain_scale": b.coef[STEP_COEFFICIENT.format(0)][i].detach()}
            entry.update({k: v[i].detach() for k, v in b.info.items()})
            out[f.layer.name] = entry
    opt.runtime.diagnostics = out
