"""KOALA-V's surrogate: one scalar P shared by all layers of a group (as released).

predict:  P ← P + q
per layer: S_ℓ = P ‖H_ℓ‖² + R;  θ_ℓ ← θ_ℓ − η L_ℓ (P / S_ℓ) g_ℓ
after all layers: P ← P − P² · max_ℓ (‖H_ℓ‖² / S_ℓ)

The released code steps along the raw gradient g_ℓ, not H_ℓ = g_ℓ + wd θ_ℓ; ``direction=
"gradient"`` keeps that (the ``koala-v`` preset), ``direction="measurement"`` steps along H_ℓ.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.program import Expr, Vec
from kalmanopt.state import GroupState, StateTable

__all__ = ["ScalarSurrogate", "DIRECTIONS", "shared_posterior_ratio"]

DIRECTIONS = ("gradient", "measurement")


def shared_posterior_ratio(ratio: Tensor, skip: Tensor) -> Tensor:
    """max over the updated layers of a per-layer ratio (−inf where no layer updated)."""
    if ratio.numel() == 0:
        return ratio.new_full((), -torch.inf)
    return torch.where(skip, -torch.inf, ratio).max()


class ScalarSurrogate(CovarianceSurrogate):
    """P = p I with one scalar p per parameter group (KOALA-V)."""

    state_dim = 1
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I"),
    )

    def __init__(self, direction: str = "gradient") -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; valid choices: {', '.join(DIRECTIONS)}")
        self.direction_kind = direction

    def options(self) -> dict[str, object]:
        return {"direction": self.direction_kind}

    def state_table(self) -> StateTable:
        # P_0 = sigma
        return StateTable(group=(GroupState("P", lambda hp: float(hp["sigma"]), "the shared scalar P"),))

    def predict_group(self, b: Any, F: Tensor, Q: Tensor) -> None:
        P = b.group_value("P")
        # P̂ = F P Fᵀ + Q  (F = 1: P ← P + q)
        b.new_group["P"] = F[0, 0] * P * F[0, 0] + Q[0]

    def coefficients(self, b: Any) -> None:
        P, hh = b.group_value("P"), b.red["hh"]
        # S_ℓ = P ‖H_ℓ‖² + R
        S = P * hh + b.R
        b.S = S
        # K_ℓ = (P / S_ℓ) · direction
        b.gain = [P / S]
        # P ← P − P² · max_ℓ (‖H_ℓ‖² / S_ℓ), computed as P (1 − max_ℓ P ‖H_ℓ‖² / S_ℓ) clamped at 0: the same for
        # P > 0, and it never overflows (‖H‖² / S does where P ‖H‖² ≪ R_k ≈ 0) nor goes below 0; an
        # overflowing S_ℓ counts as 1
        ratio = shared_posterior_ratio(torch.nan_to_num(P * hh / S, nan=1.0), b.skip)
        b.new_group["P"] = torch.where(ratio > -torch.inf, P * (1 - ratio).clamp_min(0.0), P)

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        # the released KOALA-V steps along the raw gradient g_ℓ
        return Vec("g") if self.direction_kind == "gradient" else Vec("H")
