"""KOALA-M's surrogate: one 2×2 P over (θ, u) shared by all layers of a group (as released).

P_0 = [[sw, sc], [sc, sv]];  predict: P ← F P Fᵀ + diag(q_w, q_v)
per layer: S_ℓ = ‖H_ℓ‖² P₀₀ + R;  K_θ = (P₀₀ / S_ℓ) H_ℓ;  K_u = (P₁₀ / S_ℓ) H_ℓ
after all layers: P ← P − P E Pᵀ with E = [[max_ℓ ‖H_ℓ‖² / S_ℓ, 0], [0, 0]]
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate, Gain, UpdateContext
from kalmanopt.hyperparams import HyperParameter, Range

__all__ = ["BlockSurrogate"]


class BlockSurrogate(CovarianceSurrogate):
    """P = [[p_ww, p_wu], [p_uw, p_uu]] ⊗ I with one 2×2 block per parameter group (KOALA-M)."""

    state_dim = 2
    hyperparameters = (
        HyperParameter("sw", 0.1, Range(0.0, low_open=True), "initial covariance of the weights, P₀₀"),
        HyperParameter("sc", 0.0, Range(), "initial covariance between weights and velocities, P₀₁"),
        HyperParameter("sv", 0.1, Range(0.0, low_open=True), "initial covariance of the velocities, P₁₁"),
    )

    def check_hyperparameters(self, hp: Mapping[str, Any]) -> None:
        # P_0 = [[sw, sc], [sc, sv]] must be a covariance: positive semi-definite, sc² ≤ sw · sv
        sw, sc, sv = float(hp["sw"]), float(hp["sc"]), float(hp["sv"])
        if abs(sc) > (sw * sv) ** 0.5 * (1.0 + 1e-12):  # (with room for rounding in a boundary value)
            raise ValueError(f"hyper-parameters sw = {sw!r}, sc = {sc!r}, sv = {sv!r} do not make P_0 = "
                             f"[[sw, sc], [sc, sv]] a covariance; valid region: |sc| <= sqrt(sw * sv) = "
                             f"{(sw * sv) ** 0.5:g}")

    def init_group_state(self, group_state: dict, hp: Mapping[str, Any], dtype: torch.dtype,
                         device: torch.device) -> None:
        # P_0 = [[sw, sc], [sc, sv]]
        group_state["P"] = torch.tensor([[float(hp["sw"]), float(hp["sc"])], [float(hp["sc"]), float(hp["sv"])]],
                                        dtype=dtype, device=device)

    def predict(self, group_state: dict, F: Tensor, Q: Tensor, hp: Mapping[str, Any]) -> None:
        P = group_state["P"]
        # P̂ = F P Fᵀ + diag(q_w, q_v)
        P.copy_(F @ P @ F.T + torch.diag(Q))

    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        P = ctx.group_state["P"]
        HH = torch.dot(H, H)
        # S_ℓ = ‖H_ℓ‖² P₀₀ + R
        S = HH * P[0, 0] + R
        ctx.per_layer.append(HH / S)
        # K_θ = (P₀₀ / S_ℓ) H_ℓ,  K_u = (P₁₀ / S_ℓ) H_ℓ
        return Gain(direction=H, coefficients=torch.stack([P[0, 0], P[1, 0]]) / S, S=S)

    def end_update(self, ctx: UpdateContext, group_state: dict, hp: Mapping[str, Any]) -> None:
        if not ctx.per_layer:
            return
        P = group_state["P"]
        # E = [[max_ℓ ‖H_ℓ‖² / S_ℓ, 0], [0, 0]]
        E = torch.zeros_like(P)
        E[0, 0] = torch.max(torch.stack(ctx.per_layer))
        # P ← P − P E Pᵀ
        P.copy_(P - P @ E @ P.T)
