"""The gradient measurement: each minibatch gradient is a noisy measurement of the true gradient.

The loss measurement (:mod:`kalmanopt.measurement`) gives the filter one scalar per layer and step.
This model gives it one measurement per *coordinate*: the minibatch gradient ``g`` measures the
gradient of the expected loss, coordinate by coordinate, each with its own noise variance, which
the surrogate estimates online (:class:`~kalmanopt.covariance.adaptive.AdaptiveDiagonalSurrogate`;
docs/derivation.md, section "koala-adam").

The innovation of coordinate i is the vector entry ``0 − H_i`` (the target gradient is 0), so it is
carried by the gain's direction and the scalar factor of the contract's step, L_ℓ, is 1:

    H_ℓ = g_ℓ;   L_ℓ = 1;   R_k as the loss measurement's (tracked, not read by the step: the
                            per-coordinate noise lives in the surrogate)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from kalmanopt.measurement import SKIP_GRAD_NORM, LossMeasurement
from kalmanopt.program import Assign, Reduction, Vec

__all__ = ["GradientMeasurement"]


class GradientMeasurement(LossMeasurement):
    """The minibatch gradient as a per-coordinate measurement of the true gradient.

    H_ℓ = g_ℓ;  L_ℓ = 1 (the innovation −H_ℓ is a vector, carried by the surrogate's direction;
    with the guard, L_ℓ = 0 where the loss is below the target L*, ``target`` (0 by default): a zero step).
    R_k, the noise of the scalar loss, follows ``r`` and ``alpha_r`` as in
    :class:`~kalmanopt.measurement.LossMeasurement` (reported in the diagnostics, so that every
    preset takes the same noise keywords) but the step does not read it: the noise that matters
    here is per coordinate, estimated by the surrogate. A layer whose ‖g_ℓ‖₂ < 1e-9 is skipped,
    and so is one whose ‖g_ℓ‖² overflows the state precision (counted as ``overflow``).
    Weight decay is not part of the measurement: the
    :class:`~kalmanopt.dynamics_decay.DecayingRandomWalk` dynamics apply ``weight_decay``, decoupled.
    """

    # r and alpha_r as the loss measurement's; weight decay belongs to the dynamics (decoupled)
    hyperparameters = tuple(h for h in LossMeasurement.hyperparameters if h.name != "weight_decay")

    def reductions(self, hp: Mapping[str, Any]) -> tuple[Reduction, ...]:
        # ‖H_ℓ‖² = ‖g_ℓ‖²
        return (Reduction("hh", Vec("H") * Vec("H")),)

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        # H_ℓ = g_ℓ
        return [Assign(Vec("H"), Vec("g"))]

    def coefficients(self, b: Any) -> None:
        hh = b.red["hh"]
        R_k = self.next_noise(b.group["R"], b.statistic, b.hp)
        if b.hp["r"] is None:
            b.new_group["R"] = R_k
        b.R = R_k
        # L_ℓ = 1: the step's scalar factor; the innovation −H_ℓ is in the direction. With the guard a
        # loss below the target L* (``target``, 0 by default) gives a zero step, as for every preset (L_ℓ = 0)
        under = b.loss < float(b.hp.get("target", 0.0))
        b.count("below_target", under.to(torch.int64))
        below = under if b.hp.get("guard", True) else torch.zeros((), dtype=torch.bool, device=hh.device)
        b.L = torch.where(below, torch.zeros_like(hh), torch.ones_like(hh))
        small = ~(torch.sqrt(hh) >= SKIP_GRAD_NORM)
        overflow = ~small & ~torch.isfinite(hh)
        b.skip = b.skip | small | overflow
        b.count("overflow", overflow.sum())
