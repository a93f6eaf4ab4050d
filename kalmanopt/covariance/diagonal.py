"""A diagonal surrogate: one variance per parameter (beyond the published anchors).

p_0 = sigma;  p̂ = p + q;  S = Σ p̂ ∘ H² + R;  K = (p̂ ∘ H) / S;  p ← p̂ − (p̂ ∘ H)² / S
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from kalmanopt.covariance.base import CovarianceSurrogate
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.program import Assign, Coef, Expr, Reduction, State, Vec
from kalmanopt.state import StateTable, VectorState

__all__ = ["DiagonalSurrogate"]


class DiagonalSurrogate(CovarianceSurrogate):
    """P = diag(p), per layer; the random-walk predict p̂ = p + q is folded into the update."""

    state_dim = 1
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial variance of every parameter"),
    )

    def state_table(self) -> StateTable:
        # p_0 = sigma
        return StateTable(vectors=(VectorState("p", "sigma", "the variance of each parameter"),))

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        # Σ p H²  (Σ p̂ H² = Σ p H² + q ‖H‖²)
        return (Reduction("pHH", State("p") * Vec("H") * Vec("H")),)

    def coefficients(self, b: Any) -> None:
        q = float(b.hp["q"])
        # S = Σ p̂ ∘ H² + R = Σ p H² + q ‖H‖² + R
        S = b.red["pHH"] + q * b.red["hh"] + b.R
        b.S = S
        b.coef.update(q=torch.full_like(S, q), S=S)
        # K = (p̂ ∘ H) / S
        b.gain = [1.0 / S]

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        p, H = State("p"), Vec("H")
        p_hat, PH = Vec("p_hat"), Vec("PH")
        return [
            # p̂ = p + q
            Assign(p_hat, p + Coef("q")),
            # P̂ Hᵀ = p̂ ∘ H
            Assign(PH, p_hat * H),
            # p ← p̂ − (p̂ ∘ H)² / S, computed as p̂ ∘ (1 − (p̂ ∘ H / S) ∘ H): no overflow of (p̂ ∘ H)²; the
            # factor, in [0, 1] in exact arithmetic, is clamped at 0 where rounding takes it below
            Assign(p, p_hat * (1.0 - (PH / Coef("S")) * H).clamp_min(0.0)),
        ]

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        return Vec("PH")
