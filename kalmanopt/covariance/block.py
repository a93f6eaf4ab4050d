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
        P, hh = as_covariance(b.group_value("P")), b.red["hh"]
        P00, P10, P11 = P[0, 0], P[1, 0], P[1, 1]
        # S_ℓ = ‖H_ℓ‖² P₀₀ + R
        S = hh * P00 + b.R
        b.S = S
        # K_θ = (P₀₀ / S_ℓ) H_ℓ,  K_u = (P₁₀ / S_ℓ) H_ℓ
        b.gain = [P00 / S, P10 / S]
        # P ← P − P E Pᵀ with E = [[max_ℓ ‖H_ℓ‖² / S_ℓ, 0], [0, 0]] over the updated layers, written with
        # ρ = max_ℓ P₀₀ ‖H_ℓ‖² / S_ℓ ∈ [0, 1] (an overflowing S_ℓ counts as 1):
        #   P₀₀ ← P₀₀ (1 − ρ),  P₁₀ ← P₁₀ (1 − ρ),  P₁₁ ← P₁₁ − ρ (P₁₀ / √P₀₀)²
        # the same for P₀₀ > 0, and finite where the released form is not: ‖H‖² / S = ∞ where P₀₀ ‖H‖² ≫ R ≈ 0
        # (then ∞ · 0 = NaN); the factors are clamped at 0 where rounding takes them below, and the result is
        # kept a covariance (below)
        ratio = shared_posterior_ratio(torch.nan_to_num(P00 * hh / S, nan=1.0), b.skip)
        f = (1 - ratio).clamp_min(0.0)
        root = torch.sqrt(P00)
        shrink = torch.where(root > 0, P10 / torch.where(root > 0, root, 1.0), 0.0)
        new = torch.stack([torch.stack([P00 * f, P10 * f]),
                           torch.stack([P10 * f, (P11 - ratio * shrink * shrink).clamp_min(0.0)])])
        b.new_group["P"] = torch.where(ratio > -torch.inf, as_covariance(new), P)

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        return Vec("H")


def as_covariance(P: Tensor) -> Tensor:
    """The 2×2 ``P`` kept a covariance against rounding: P₀₀, P₁₁ ≥ 0 and |P₁₀| ≤ √(P₀₀ P₁₁).

    In exact arithmetic every P the filter makes is one (P_0 is checked, the predict and the posterior
    keep it); rounding can take P₀₀ or the determinant of a nearly singular P below 0, and then
    S = ‖H‖² P₀₀ + R ≤ 0 or P̂₀₀ = P₀₀ + 2 P₁₀ + P₁₁ < 0 at the next predict. A P that is one is returned
    unchanged, bit for bit.
    """
    P00, P11 = P[0, 0].clamp_min(0.0), P[1, 1].clamp_min(0.0)
    bound = torch.sqrt(P00 * P11)
    P10 = torch.where(P[1, 0].abs() <= bound, P[1, 0], torch.copysign(bound, P[1, 0]))
    P01 = torch.where(P[0, 1].abs() <= bound, P[0, 1], torch.copysign(bound, P[0, 1]))
    return torch.stack([torch.stack([P00, P01]), torch.stack([P10, P11])])
