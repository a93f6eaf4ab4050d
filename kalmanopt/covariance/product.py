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

from kalmanopt.covariance.base import CovarianceSurrogate, Gain, LeastSquaresEstimator, UpdateContext
from kalmanopt.covariance.least_squares import SymmetricLeastSquares
from kalmanopt.hyperparams import HyperParameter, Range

__all__ = ["ProductSurrogate", "first_update_state", "needs_restart", "skip_layer", "GUARD_EPS"]

#: S_k ≤ GUARD_EPS · R_k counts as "not clearly positive"
GUARD_EPS = 1e-6


def first_update_state(H: Tensor, R: Tensor, sigma: float, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(v_{k-1}, H_{k-1}, S_{k-1}) for a layer's first update (or a guard restart).

    v_{k-1} = sigma H_k,  H_{k-1} = H_k,  S_{k-1} = (v_{k-1} + Q H_{k-1})·H_{k-1} + R_k
    """
    v_prev = sigma * H
    H_prev = H
    # S_{k-1} = y + Q x + R with x = ‖H_{k-1}‖², y = H_{k-1}·v_{k-1}
    S_prev = torch.dot(H_prev, v_prev) + Q * torch.dot(H_prev, H_prev) + R
    return v_prev, H_prev, S_prev


def needs_restart(S: Tensor, R: Tensor) -> bool:
    """The guard's rule: S_k not finite, or S_k ≤ GUARD_EPS · R_k (host sync: reference path)."""
    return not bool(torch.isfinite(S)) or bool(S <= GUARD_EPS * R)


def skip_layer(ctx: UpdateContext, H: Tensor, S: Tensor, diagnostics: dict[str, Tensor]) -> Gain:
    """A zero gain that leaves the layer's state as it was (counted as a skipped layer).

    The guard's last resort, where even the restart gives no usable S_k. In exact arithmetic a
    restart gives S_k ≥ R_k; in floating point it fails only where (σ + Q)‖H_k‖² overflows the state
    precision, or is so large against R_k (R_k near its floor, Q = 0) that S_k rounds to ≤ ε R_k.
    """
    ctx.count("skipped_layers")
    return Gain(direction=torch.zeros_like(H), coefficients=H.new_zeros(1), S=S, diagnostics=diagnostics)


class ProductSurrogate(CovarianceSurrogate):
    """Tracks v_k = H_k P_{k-1} per layer; P itself is never formed (KOALA++)."""

    state_dim = 1
    needs_estimator = True
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I"),
    )

    def __init__(self, estimator: LeastSquaresEstimator | None = None) -> None:
        self.estimator = estimator if estimator is not None else SymmetricLeastSquares()

    def options(self) -> dict[str, object]:
        return {"estimator": self.estimator}

    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        Q = ctx.Q[0]
        if "v" not in layer_state:
            v_prev, H_prev, S_prev = first_update_state(H, R, hp["sigma"], Q)
        else:
            v_prev, H_prev, S_prev = layer_state["v"], layer_state["H"], layer_state["S"]
        v, S, diag = self._recursion(H, H_prev, v_prev, S_prev, R, Q)
        if hp.get("guard", True) and needs_restart(S, R):
            ctx.count("guard_restarts")
            v, S, diag = self._recursion(H, *first_update_state(H, R, hp["sigma"], Q), R, Q)
            if needs_restart(S, R):  # the restart fails too (overflow or rounding): skip, change nothing
                return skip_layer(ctx, H, S, diag)
        # store v_k, H_k, S_k
        layer_state["v"], layer_state["H"], layer_state["S"] = v, H.clone(), S
        # K = P̂ Hᵀ / S_k = (v_k + Q H_k) / S_k
        return Gain(direction=v + Q * H, coefficients=(1.0 / S).reshape(1), S=S, diagnostics=diag)

    def _recursion(self, H: Tensor, H_prev: Tensor, v_prev: Tensor, S_prev: Tensor, R: Tensor,
                   Q: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step of Algorithm 1: returns (v_k, S_k, diagnostics)."""
        # λ_k = H_k·(v_{k-1} + Q H_{k-1}) / S_{k-1}
        lam = (torch.dot(H, v_prev) + Q * torch.dot(H, H_prev)) / S_prev
        # H_k P̃ = α_k v_{k-1} + w_k H_{k-1}   (least-squares estimate of H_k P_{k-2})
        alpha, w = self.estimator.single(H, H_prev, v_prev)
        # v_k = (α_k − λ_k) v_{k-1} + Q (H_k − λ_k H_{k-1}) + w_k H_{k-1}
        v = (alpha - lam) * v_prev + Q * (H - lam * H_prev) + w * H_prev
        # S_k = (v_k + Q H_k)·H_k + R_k
        S = torch.dot(v + Q * H, H) + R
        diag = {"lambda": lam, "alpha": alpha, "w": w, "cos_Hv": _cosine(H, v)}
        return v, S, diag


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos ∠(a, b), 0 where either vector is zero."""
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    return torch.where(denom > 0, torch.dot(a, b) / denom.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
