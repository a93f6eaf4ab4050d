"""The measurement model: what a minibatch tells the filter (:ref:`docs/derivation.md §1 <derivation-measurement>`).

Each minibatch loss L_k(θ) is a noisy scalar measurement of the target L* = 0. Per layer the
measurement Jacobian is the gradient with weight decay folded in, and the measured value is the
loss with the layer's decay term added. The measurement noise R_k is fixed or estimated online.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.part import Part

__all__ = ["MeasurementModel", "LossMeasurement", "LOSS_STATISTICS", "loss_statistic", "split_losses"]

#: the loss statistics an online R estimate can follow
LOSS_STATISTICS = ("second_moment", "variance")


def loss_statistic(losses: Tensor, kind: str) -> Tensor:
    """The statistic s_k of per-sample losses that the online R estimate follows.

    Args:
        losses: per-sample losses ℓ_i (any shape; a scalar counts as one sample).
        kind: ``"second_moment"``: mean_i ℓ_i² (the authors' image code), or ``"variance"``:
            mean_i ℓ_i² − (mean_i ℓ_i)² (their language-model code).
    """
    if kind not in LOSS_STATISTICS:
        raise ValueError(f"unknown loss_statistic {kind!r}; valid choices: {', '.join(LOSS_STATISTICS)}")
    losses = losses.detach()
    second_moment = torch.mean(torch.pow(losses, 2))
    if kind == "second_moment":
        return second_moment
    return second_moment - torch.mean(losses) ** 2


def split_losses(loss: Tensor | float, kind: str, needs_statistic: bool) -> tuple[Tensor, Tensor | None]:
    """(L_k, s_k) from the per-sample losses (or their mean) a step is given.

    Args:
        loss: the per-sample losses ℓ_i, or their mean.
        kind: the statistic the online R follows (see :func:`loss_statistic`).
        needs_statistic: whether any filter estimates R online (else s_k is ``None``).

    Raises:
        TypeError: a loss that is not floating point.
        ValueError: an empty loss, or ``"variance"`` asked of a single (mean) loss.
    """
    losses = torch.as_tensor(loss).detach()
    if not losses.is_floating_point():
        raise TypeError(f"the loss must be a floating-point tensor, got {losses.dtype}")
    if losses.numel() == 0:
        raise ValueError("the loss is empty; pass the per-sample losses or their mean")
    mean = losses.mean()
    if not needs_statistic:
        return mean, None
    if losses.numel() == 1 and kind == "variance":
        raise ValueError("loss_statistic='variance' needs the per-sample losses "
                         "(reduction='none'), got a scalar loss; pass step(loss=losses) or fix r")
    return mean, loss_statistic(losses, kind)


class MeasurementModel(Part, ABC):
    """Turns a minibatch into the per-layer measurement (L_ℓ, H_ℓ) and the noise R_k."""

    @abstractmethod
    def init_state(self, group_state: dict, dtype: torch.dtype, device: torch.device) -> None:
        """Create this model's group-level state tensors in ``group_state``."""

    @abstractmethod
    def noise(self, group_state: dict, statistic: Tensor | None, hp: Mapping[str, Any]) -> Tensor:
        """Advance the noise estimate once per step (before any layer) and return R_k."""

    @abstractmethod
    def measure(self, theta: Tensor, g: Tensor, loss: Tensor, hp: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Return (H_ℓ, L_ℓ): the layer's measurement Jacobian and measured value."""


class LossMeasurement(MeasurementModel):
    """The loss as the measurement, weight decay folded into H and L, R fixed or an EMA.

    H_ℓ = g_ℓ + wd · θ_ℓ;   L_ℓ = L_k + ½ · wd · ‖θ_ℓ‖²;
    R_k = r if r is given, else R_k = α_r R_{k-1} + (1 − α_r) s_k with R_0 = 1.
    """

    hyperparameters = (
        HyperParameter("r", None, Range(0.0, low_open=True, allow_none=True),
                       "fixed measurement noise R; None estimates it online from the loss statistic"),
        HyperParameter("alpha_r", 0.9, Range(0.0, 1.0, high_open=True),
                       "smoothing of the online estimate R_k = α_r R_{k-1} + (1 − α_r) s_k"),
        HyperParameter("weight_decay", 0.0, Range(0.0), "L2 weight decay folded into H and L"),
    )

    def init_state(self, group_state: dict, dtype: torch.dtype, device: torch.device) -> None:
        # R_0 = 1
        group_state["R"] = torch.ones((), dtype=dtype, device=device)

    def noise(self, group_state: dict, statistic: Tensor | None, hp: Mapping[str, Any]) -> Tensor:
        R = group_state["R"]
        R_k = self.next_noise(R, statistic, hp)
        if hp["r"] is None:
            R.copy_(R_k)
        return R_k

    @staticmethod
    def next_noise(R: Tensor, statistic: Tensor | None, hp: Mapping[str, Any]) -> Tensor:
        """R_k from R_{k-1} (not in place): what :meth:`noise` stores, for the fast paths too."""
        # R_k is kept at or above the smallest normal number of the state precision, so that S_k ≥ R_k > 0
        # (an R that underflows to 0, e.g. after many zero losses, would make S_k = 0 possible)
        floor = torch.finfo(R.dtype).tiny
        if hp["r"] is not None:
            # R_k = r (fixed)
            return torch.full_like(R, hp["r"]).clamp_min_(floor)
        if statistic is None:
            raise ValueError("r is None (online noise estimate) but no loss statistic was given")
        # R_k = α_r R_{k-1} + (1 − α_r) s_k   (a statistic below 0 — a variance rounded below zero — counts as 0)
        alpha = hp["alpha_r"]
        return (alpha * R + (1.0 - alpha) * statistic.to(R).clamp_min(0.0)).clamp_min(floor)

    def measure(self, theta: Tensor, g: Tensor, loss: Tensor, hp: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        wd = hp["weight_decay"]
        # H_ℓ = g_ℓ + wd · θ_ℓ
        H = g + wd * theta
        # L_ℓ = L_k + ½ · wd · ‖θ_ℓ‖²
        L = loss.to(theta) + 0.5 * wd * torch.dot(theta, theta)
        return H, L
