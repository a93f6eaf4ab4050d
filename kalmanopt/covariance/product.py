"""KOALA++'s surrogate: the gradient-covariance product v_k = H_k P_{k-1} (Algorithm 1).

Since P̂_{k-1} = P_{k-2} + Q I and P_{k-1} = P̂_{k-1} − P̂_{k-1} H_{k-1}ᵀ H_{k-1} P̂_{k-1} / S_{k-1},

    v_k = H_k P_{k-2} + Q H_k − λ_k (v_{k-1} + Q H_{k-1}),   λ_k = H_k·(v_{k-1} + Q H_{k-1}) / S_{k-1}

and a least-squares estimator supplies H_k P_{k-2} ≈ α_k v_{k-1} + w_k H_{k-1}. Per layer:

    v_k = (α_k − λ_k) v_{k-1} + Q (H_k − λ_k H_{k-1}) + w_k H_{k-1}
    S_k = (v_k + Q H_k)·H_k + R_k
    θ_k = θ_{k-1} − η_k L_ℓ (v_k + Q H_k) / S_k

On a layer's first update v_{k-1} = sigma H_k, H_{k-1} = H_k, S_{k-1} = (v_{k-1} + Q H_{k-1})·H_{k-1} + R_k.

The positive-definiteness guard (beyond the paper, on by default, ``guard=False`` turns it off):
the product surrogate is not guaranteed to keep S_k > 0. Where S_k is not finite or
S_k ≤ guard_eps · R_k, the layer restarts from its first-update state (v_{k-1} = sigma H_k), which
always gives S_k ≥ R_k > 0, and the event is counted as ``guard_restarts``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate, LeastSquaresEstimator
from kalmanopt.covariance.least_squares import SymmetricLeastSquares
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.program import Assign, Coef, Expr, Reduction, State, Vec
from kalmanopt.state import ScalarState, StateTable, VectorState

__all__ = ["ProductSurrogate", "GUARD_EPS", "cosine_from_dots"]

#: S_k ≤ GUARD_EPS · R_k counts as "not clearly positive"
GUARD_EPS = 1e-6


class ProductSurrogate(CovarianceSurrogate):
    """Tracks v_k = H_k P_{k-1} per layer; P itself is never formed (KOALA++).

    State per layer: v (v_{k-1}), H (H_{k-1}) and S (S_{k-1}; 0 marks a layer with no update yet).
    """

    state_dim = 1
    needs_estimator = True
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I"),
    )

    def __init__(self, estimator: LeastSquaresEstimator | None = None) -> None:
        self.estimator = estimator if estimator is not None else SymmetricLeastSquares()

    def options(self) -> dict[str, object]:
        return {"estimator": self.estimator}

    def contract_gap(self) -> str | None:
        gap = super().contract_gap()
        if gap is None and type(self.estimator).single_coefficients is LeastSquaresEstimator.single_coefficients:
            return f"its estimator {type(self.estimator).__name__} has no batched single_coefficients()"
        return gap

    # ------------------------------------------------------------------ the two-pass contract
    def state_table(self) -> StateTable:
        return StateTable(vectors=(VectorState("v", 0.0, "v_{k-1} = H_{k-1} P_{k-2}"),
                                   VectorState("H", 0.0, "H_{k-1}")),
                          scalars=(ScalarState("S", 0.0, "S_{k-1} (0: no update yet)"),))

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        H, H_prev, v_prev = Vec("H"), State("H"), State("v")
        # the five dots of H_k, H_{k-1}, v_{k-1} (‖H_k‖² is the measurement's "hh")
        dots = (Reduction("hhp", H * H_prev), Reduction("hvp", H * v_prev), Reduction("x", H_prev * H_prev),
                Reduction("y", H_prev * v_prev))
        # ‖v_{k-1}‖², for cos ∠(H_k, v_k) in the diagnostics only
        return dots + ((Reduction("vv", v_prev * v_prev),) if diagnostics else ())

    def coefficients(self, b: Any) -> None:
        hp, red = b.hp, b.red
        sigma, q, R = float(hp["sigma"]), float(hp["q"]), b.R
        hh, hhp, hvp, x, y = red["hh"], red["hhp"], red["hvp"], red["x"], red["y"]
        S_prev = b.layer["S"]
        first = S_prev == 0
        # first update: v_{k-1} = sigma H_k, H_{k-1} = H_k, S_{k-1} = (v_{k-1} + Q H_{k-1})·H_{k-1} + R_k
        hhp = torch.where(first, hh, hhp)
        hvp = torch.where(first, sigma * hh, hvp)
        x = torch.where(first, hh, x)
        y = torch.where(first, sigma * hh, y)
        S0 = sigma * hh + q * hh + R
        S_before = torch.where(first, S0, S_prev)
        # λ_k = H_k·(v_{k-1} + Q H_{k-1}) / S_{k-1}
        lam = (hvp + q * hhp) / S_before
        # H_k P̃ = α_k v_{k-1} + w_k H_{k-1}  (the least-squares estimate of H_k P_{k-2})
        alpha, w = self.estimator.single_coefficients(hhp, hvp, x, y)
        # v_k = (α_k − λ_k) v_{k-1} + Q H_k + (w_k − Q λ_k) H_{k-1}  =  a v_{k-1} + b H_k + c H_{k-1}
        a, bq, c = alpha - lam, torch.full_like(hh, q), w - q * lam
        # S_k = (v_k + Q H_k)·H_k + R_k
        S = a * hvp + bq * hh + c * hhp + q * hh + R
        # The first-update state in closed form (α_k = 1, w_k = 0): v_k = b0 H_k with
        # b0 = (1 − λ_k)(sigma + Q) = (sigma + Q) R_k / S_{k-1}, S_k = (b0 + Q)‖H_k‖² + R_k. Written with
        # R_k / S_{k-1} rather than 1 − λ_k, which cancels to 0 where R_k ≪ (sigma + Q)‖H_k‖² (an R on its
        # floor): v_k = 0, S_k = R_k, and a gain 1/S_k that overflows against a direction of 0.
        b0 = (sigma + q) * (R / S0)
        S_fresh = (b0 + q) * hh + R
        a = torch.where(first, 0.0, a)
        bq = torch.where(first, b0, bq)
        c = torch.where(first, 0.0, c)
        S = torch.where(first, S_fresh, S)
        if hp.get("guard", True):
            # the guard: restart from the first-update state where S_k is not finite or S_k ≤ eps R_k
            restart = ~first & (~torch.isfinite(S) | (S <= GUARD_EPS * R))
            a = torch.where(restart, 0.0, a)
            bq = torch.where(restart, b0, bq)
            c = torch.where(restart, 0.0, c)
            S = torch.where(restart, S_fresh, S)
            b.count("guard_restarts", (restart & ~b.skip).sum())
            # where even the first-update state gives no usable S_k ((sigma + Q)‖H_k‖² overflows, or S_k
            # rounds to ≤ eps R_k), the layer is skipped unchanged
            unusable = ~torch.isfinite(S0) | ~torch.isfinite(S_fresh) | (S_fresh <= GUARD_EPS * R)
            b.skip = b.skip | ((restart | first) & unusable)
        b.coef.update(a=a, b=bq, c=c, q=torch.full_like(hh, q))
        b.new_layer["S"] = S
        b.S = S
        # K = P̂ Hᵀ / S_k = (v_k + Q H_k) / S_k
        b.gain = [1.0 / S]
        if b.diagnostics:
            b.info.update({"lambda": lam, "alpha": alpha, "w": w,
                           "cos_Hv": cosine_from_dots(a, bq, c, hh, hhp, hvp, x, y, red.get("vv"), first, sigma)})

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        v, H_prev, H = State("v"), State("H"), Vec("H")
        return [
            # v_k = a v_{k-1} + b H_k + c H_{k-1}
            Assign(v, Coef("a") * v + Coef("b") * H + Coef("c") * H_prev),
            # store H_k
            Assign(H_prev, H),
        ]

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        # P̂ Hᵀ = v_k + Q H_k
        return State("v") + Coef("q") * Vec("H")


def cosine_from_dots(a: Tensor, b: Tensor, c: Tensor, hh: Tensor, hhp: Tensor, hvp: Tensor, x: Tensor, y: Tensor,
                     vv: Tensor | None, first: Tensor, sigma: float) -> Tensor:
    """cos ∠(H_k, v_k) for v_k = a v_{k-1} + b H_k + c H_{k-1}, from the step's dots (0 where a vector is 0)."""
    vv = torch.where(first, sigma * sigma * hh, vv if vv is not None else torch.zeros_like(hh))
    # v_k·H_k and ‖v_k‖² expanded over v_{k-1}, H_k, H_{k-1}
    vH = a * hvp + b * hh + c * hhp
    vnorm2 = (a * a * vv + b * b * hh + c * c * x + 2 * a * b * hvp + 2 * a * c * y + 2 * b * c * hhp).clamp_min(0.0)
    denom = torch.sqrt(vnorm2 * hh)
    tiny = torch.finfo(hh.dtype).tiny
    return torch.where(denom > 0, (vH / denom.clamp_min(tiny)).clamp(-1.0, 1.0), torch.zeros_like(hh))
