"""Recording a Kalman optimizer's per-layer internals every few steps, off the timed path.

Recording needs ``track_diagnostics``: the engine in use then keeps the step's per-layer tensors
(S, the gain scale, λ, α, w, cos ∠(H, v)) and the step is not replayed from a CUDA graph, which
costs host time. So the runner records only at chosen steps (``diagnostics_every``):
:class:`DiagnosticsRecorder` switches ``optimizer.track_diagnostics`` on for those steps alone and
the training loop leaves them out of its ``ms / step``, which therefore measures the steps users run.

The interface is three calls (:meth:`~DiagnosticsRecorder.due`, :meth:`~DiagnosticsRecorder.start`,
:meth:`~DiagnosticsRecorder.finish`), so an engine that records its own diagnostics can replace
this class without touching the loop.
"""

from __future__ import annotations

from typing import Any

import torch

from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["DiagnosticsRecorder"]


class DiagnosticsRecorder:
    """Per-layer internals of a :class:`~kalmanopt.KalmanOptimizer` at every ``every``-th step.

    Args:
        optimizer: the optimizer; a torch baseline records nothing (:attr:`enabled` is False).
        every: steps between records (step numbers ``every``, ``2 * every``, ...); 0 or None: never.
        names: the optimizer's layer keys -> the model's parameter names.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int | None, names: dict[str, str]) -> None:
        self.optimizer = optimizer
        self.every = int(every or 0)
        self.names = names
        self.enabled = isinstance(optimizer, KalmanOptimizer) and self.every > 0
        # a user who built the optimizer with track_diagnostics=True keeps it on every step
        self.always = bool(getattr(optimizer, "track_diagnostics", False))

    def due(self, step: int) -> bool:
        """Whether the step numbered ``step`` (1-based: the step about to be taken) is recorded."""
        return self.enabled and step % self.every == 0

    def start(self) -> None:
        """Switch recording on for the next ``optimizer.step()``."""
        self.optimizer.track_diagnostics = True

    def finish(self) -> dict[str, Any]:
        """Switch recording off again; the step's ``counters`` and ``layers`` (by parameter name)."""
        diag = self.optimizer.diagnostics()
        self.optimizer.track_diagnostics = self.always
        return {"counters": diag["counters"],
                "layers": {self.names.get(k, k): v for k, v in diag["layers"].items()}}
