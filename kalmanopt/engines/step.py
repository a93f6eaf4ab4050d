"""The entry points of a step: ``step()`` and the two-phase ``update()`` / ``predict()``.

``step`` tries a replayed CUDA graph first (:mod:`kalmanopt.engines.graphs`), then runs the phases of
:mod:`kalmanopt.engines.driver`: the predict where none has run yet, the update, the next predict. The
entry points are opaque to ``torch.compile``: a compiled region that calls ``opt.step`` runs the step as
written (its engines launch their own kernels and capture their own CUDA graphs) rather than having dynamo
trace the host bookkeeping.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kalmanopt.contract import CODE_SKIPS
from kalmanopt.engines import driver, graphs
from kalmanopt.engines.ranks import NoGradientOnAnyRank
from kalmanopt.engines.runtime import OptimizerView

__all__ = ["run_step", "run_two_phase_update", "run_predict"]


@torch.compiler.disable
def run_predict(opt: OptimizerView) -> None:
    """``predict()`` of the two-phase API: the predict phase of every group, unmasked."""
    driver.run_predict(opt, None)


@torch.compiler.disable
def run_step(opt: OptimizerView, loss: Tensor, statistic: Tensor | None) -> None:
    """``step``: the update for the current gradients, then the predict of the next step.

    The first predict runs before the first update, masked by the step's inputs. On an engine with
    ``device_step`` nothing synchronises with the host.
    """
    driver.strict_check(opt, loss, statistic)
    driver.report_landed(opt)
    if driver.no_gradient(opt, "step()"):
        return
    amp = driver.grad_scaler_code(opt)
    if amp is None and graphs.graphed_step(opt, loss, statistic):
        return
    try:
        code = driver.predict_if_due_then_update(opt, loss, statistic, amp, ride_predict=True)
    except NoGradientOnAnyRank:  # several processes: no rank has a gradient (they found out together)
        opt.runtime.warn_once("no gradient", driver.MESSAGES["no gradient"].format(call="step()"))
        return
    driver.run_predict(opt, (code & CODE_SKIPS) == 0, ridden=True)
    driver.report(opt, code)


@torch.compiler.disable
def run_two_phase_update(opt: OptimizerView, loss: Tensor, statistic: Tensor | None) -> bool:
    """``update()`` of the two-phase API: the update (its predict must have run); whether it was applied.

    An ``update()`` without a ``predict()`` since the last one runs the predict first, as ``step`` does,
    where the predict does not move the parameters (the gradient does not depend on it); where it does
    (KOALA-M: θ̂ = θ + u), the gradient was taken at the wrong point, and this raises ``RuntimeError``
    before anything changes.
    """
    if not opt.runtime.predicted and opt.filter.dynamics.moves_parameters:
        raise RuntimeError(driver.MESSAGES["update without predict"].format(name=opt.filter.name))
    driver.strict_check(opt, loss, statistic)
    driver.report_landed(opt)
    if driver.no_gradient(opt, "update()"):
        return False
    try:
        code = driver.predict_if_due_then_update(opt, loss, statistic)
    except NoGradientOnAnyRank:  # several processes: no rank has a gradient (they found out together)
        opt.runtime.warn_once("no gradient", driver.MESSAGES["no gradient"].format(call="update()"))
        return False
    applied = (code & CODE_SKIPS) == 0
    opt.runtime.predicted = not bool(applied)  # a skipped update leaves its predict standing
    driver.report(opt, code)
    return bool(applied)
