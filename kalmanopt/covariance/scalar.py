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

from kalmanopt.covariance.base import CovarianceSurrogate, Gain, UpdateContext
from kalmanopt.hyperparams import HyperParameter, Range

__all__ = ["ScalarSurrogate", "DIRECTIONS"]

DIRECTIONS = ("gradient", "measurement")


class ScalarSurrogate(CovarianceSurrogate):
    """P = p I with one scalar p per parameter group (KOALA-V)."""

    state_dim = 1
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I"),
    )

    def __init__(self, direction: str = "gradient") -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; valid choices: {', '.join(DIRECTIONS)}")
        self.direction = direction

    def options(self) -> dict[str, object]:
        return {"direction": self.direction}

    def init_group_state(self, group_state: dict, hp: Mapping[str, Any], dtype: torch.dtype,
                         device: torch.device) -> None:
        # P_0 = sigma
        group_state["P"] = torch.tensor(float(hp["sigma"]), dtype=dtype, device=device)

    def predict(self, group_state: dict, F: Tensor, Q: Tensor, hp: Mapping[str, Any]) -> None:
        P = group_state["P"]
        # P̂ = F P Fᵀ + Q  (F = 1: P ← P + q)
        P.copy_(F[0, 0] * P * F[0, 0] + Q[0])

    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        P = ctx.group_state["P"]
        HH = torch.dot(H, H)
        # S_ℓ = P ‖H_ℓ‖² + R
        S = P * HH + R
        # P ‖H_ℓ‖² / S_ℓ ∈ [0, 1], for the shared posterior (an overflowing S_ℓ counts as 1)
        ctx.per_layer.append(torch.nan_to_num(P * HH / S, nan=1.0))
        direction = g if self.direction == "gradient" else H
        # K_ℓ = (P / S_ℓ) · direction
        return Gain(direction=direction, coefficients=(P / S).reshape(1), S=S)

    def end_update(self, ctx: UpdateContext, group_state: dict, hp: Mapping[str, Any]) -> None:
        if not ctx.per_layer:
            return
        P = group_state["P"]
        # P ← P − P² · max_ℓ (‖H_ℓ‖² / S_ℓ), computed as P (1 − max_ℓ P ‖H_ℓ‖² / S_ℓ): the same for P > 0,
        # and it never overflows (‖H‖² / S does where P ‖H‖² ≪ R_k ≈ 0) nor goes below 0
        P.copy_(P * (1 - torch.max(torch.stack(ctx.per_layer))).clamp_min(0.0))
