"""KOALA-M's surrogate: one 2×2 P over (θ, u) shared by all layers of a group (as released).

P_0 = [[sw, sc], [sc, sv]];  predict: P ← F P Fᵀ + diag(q_w, q_v)
per layer: S_ℓ = ‖H_ℓ‖² P₀₀ + R;  K_θ = (P₀₀ / S_ℓ) H_ℓ;  K_u = (P₁₀ / S_ℓ) H_ℓ
after all layers: P ← P − P E Pᵀ with E = [[max_ℓ ‖H_ℓ‖² / S_ℓ, 0], [0, 0]]
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate
from kalmanopt.covariance.scalar import shared_posterior_ratio
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.program import Expr, Vec
from kalmanopt.state import GroupState, StateTable

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

    def state_table(self) -> StateTable:
        # P_0 = [[sw, sc], [sc, sv]]
        def initial(hp: Mapping[str, Any]) -> list[list[float]]:
            return [[float(hp["sw"]), float(hp["sc"])], [float(hp["sc"]), float(hp["sv"])]]

        return StateTable(group=(GroupState("P", initial, "the shared 2×2 covariance of (θ, u)"),))

    def predict_group(self, b: Any, F: Tensor, Q: Tensor) -> None:
        P = b.group_value("P")
        # P̂ = F P Fᵀ + diag(q_w, q_v)
        b.new_group["P"] = F @ P @ F.T + torch.diag(Q)

    def coefficients(self, b: Any) -> None:
        P, hh = b.group_value("P"), b.red["hh"]
        # S_ℓ = ‖H_ℓ‖² P₀₀ + R
        S = hh * P[0, 0] + b.R
        b.S = S
        # K_θ = (P₀₀ / S_ℓ) H_ℓ,  K_u = (P₁₀ / S_ℓ) H_ℓ
        b.gain = [P[0, 0] / S, P[1, 0] / S]
        # P ← P − P E Pᵀ with E = [[max_ℓ ‖H_ℓ‖² / S_ℓ, 0], [0, 0]] over the updated layers
        ratio = shared_posterior_ratio(hh / S, b.skip)
        b.new_group["P"] = torch.where(ratio > -torch.inf, P - ratio * torch.outer(P[:, 0], P[:, 0]), P)

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        return Vec("H")
