"""A diagonal surrogate: one variance per parameter (beyond the published anchors).

p_0 = sigma;  p̂ = p + q;  S = Σ p̂ ∘ H² + R;  K = (p̂ ∘ H) / S;  p ← p̂ − (p̂ ∘ H)² / S
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate, Gain, UpdateContext
from kalmanopt.hyperparams import HyperParameter, Range

__all__ = ["DiagonalSurrogate"]


class DiagonalSurrogate(CovarianceSurrogate):
    """P = diag(p), per layer; the random-walk predict p̂ = p + q is folded into the update."""

    state_dim = 1
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial variance of every parameter"),
    )

    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        if "p" not in layer_state:
            # p_0 = sigma
            layer_state["p"] = torch.full_like(H, float(hp["sigma"]))
        p = layer_state["p"]
        # p̂ = p + q
        p_hat = p + ctx.Q[0]
        # P̂ Hᵀ = p̂ ∘ H
        PH = p_hat * H
        # S = Σ p̂ ∘ H² + R
        S = torch.dot(PH, H) + R
        # p ← p̂ − (p̂ ∘ H)² / S, computed as p̂ ∘ (1 − (p̂ ∘ H / S) ∘ H): no overflow of (p̂ ∘ H)²; the factor,
        # in [0, 1] in exact arithmetic, is clamped at 0 where rounding takes it below
        p.copy_(p_hat * (1 - (PH / S) * H).clamp_min(0.0))
        # K = (p̂ ∘ H) / S
        return Gain(direction=PH, coefficients=(1.0 / S).reshape(1), S=S)
