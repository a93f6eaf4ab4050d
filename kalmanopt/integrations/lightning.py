"""Lightning: ``KalmanCallback`` hands each ``training_step``'s loss to the filter (automatic optimization).

::

    class Model(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            return {"loss": losses.mean(), "losses": losses}      # or just losses.mean()

        def configure_optimizers(self):
            return kalmanopt.optim.KoalaPP(self.parameters(), lr=1.0)

    lightning.Trainer(callbacks=[KalmanCallback()], accumulate_grad_batches=4, precision="bf16-mixed",
                      gradient_clip_val=1.0).fit(Model(), loader)

What ``training_step`` returns is observed as it returns it: the per-sample ``"losses"`` where the dict
has them (the online R follows their statistic over the accumulated batch), else the ``"loss"`` (or the
tensor returned), a mean. Lightning's closure returns that loss divided by ``accumulate_grad_batches``,
and only the last micro-batch's: the observations win over it. A ``training_step`` that returns
``None`` (a skipped batch) observes nothing.

With ``precision="16-mixed"`` or ``"bf16-mixed"`` and ``gradient_clip_val``, Lightning refuses an optimizer
that unscales the gradients in its own step (torch's ``_step_supports_amp_scaling``, which kalmanopt's
optimizers declare for ``GradScaler``); the callback switches that off for the fit, so Lightning unscales
before it clips (bf16 has nothing to unscale) and the step takes the generic path.

Manual optimization needs no callback: call ``kalmanopt.observe(self.optimizers(), losses)`` (or
``step(loss=losses)``) before ``opt.step()``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from kalmanopt.api import find_kalman_optimizer

__all__ = ["KalmanCallback"]


class KalmanCallback(Callback):
    """Observes each training micro-batch's losses for the kalmanopt optimizer (see the module docs).

    Raises:
        TypeError: (at ``fit``) no kalmanopt optimizer among the trainer's optimizers.
        RuntimeError: (at ``fit``) manual optimization (observe in ``training_step`` instead).
        ValueError: a ``"losses"`` entry that is not a tensor of per-sample losses.
    """

    def __init__(self) -> None:
        self._patched: LightningModule | None = None
        self._optimizer: Any = None
        self._unscaling: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the optimizer, and wrap the module's ``training_step`` to observe what it returns."""
        if not pl_module.automatic_optimization:
            raise RuntimeError("KalmanCallback is for automatic optimization; with manual optimization call "
                               "kalmanopt.observe(self.optimizers(), losses) before opt.step() in training_step")
        found = []
        for optimizer in trainer.optimizers:
            try:
                found.append(find_kalman_optimizer(optimizer))
            except TypeError:
                continue
        if not found:
            names = " and ".join(type(o).__name__ for o in trainer.optimizers) or "no optimizer"
            raise TypeError(f"KalmanCallback: found no kalmanopt optimizer in {names}; return one from "
                            "configure_optimizers (kalmanopt.optim.KoalaPP(self.parameters(), ...) or "
                            "kalmanopt.create(...))")
        self._optimizer = found[0]
        self._unpatch()
        if isinstance(trainer.precision_plugin, MixedPrecision) and trainer.gradient_clip_val:
            self._optimizer._step_supports_amp_scaling = False  # (see the module docs; undone at the end)
            self._unscaling = self._optimizer
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            self._observe(output)
            return output

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._patched = pl_module

    def _observe(self, output: Any) -> None:
        if isinstance(output, Mapping):
            if "losses" in output:
                losses = output["losses"]
                if not isinstance(losses, Tensor) or losses.dim() == 0:
                    raise ValueError(f"training_step returned 'losses' = {type(losses).__name__} "
                                     f"{getattr(losses, 'shape', '')}; it must be the per-sample losses "
                                     "(reduction='none'), and 'loss' their mean")
                self._optimizer.observe(losses)
                return
            output = output.get("loss")
        if output is not None:
            self._optimizer.observe(output)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the module its own ``training_step`` back."""
        self._unpatch()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """(also after an exception)"""
        self._unpatch()

    def _unpatch(self) -> None:
        if self._unscaling is not None:
            self._unscaling.__dict__.pop("_step_supports_amp_scaling", None)
            self._unscaling = None
        if self._patched is not None:
            self._patched.__dict__.pop("training_step", None)
            self._patched = None
