"""The reference path: per layer, readable, each line the equation of :ref:`derivation` it implements.

This is the teaching code and the oracle the fast paths are tested against. It synchronises
with the host where a branch needs a value (the skip rule, the guard), which the fast paths
avoid. The arithmetic itself lives in the parts; this module is the loop that drives them::

    predict:  x̂_k = F x_{k-1};  P̂_k = F P_{k-1} Fᵀ + Q
    update:   R_k from the measurement model, then per layer ℓ
                  (H_ℓ, L_ℓ) = measure(θ_ℓ, g_ℓ, L_k)        H_ℓ = g_ℓ + wd θ_ℓ
                  K_ℓ = gain(H_ℓ, R_k)                        K = P̂ Hᵀ / S,  S = H P̂ Hᵀ + R
                  θ_ℓ ← θ_ℓ − η_k L_ℓ K_ℓ                     (L* = 0)
              and the shared posterior P_k = (I − K H) P̂_k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from kalmanopt.implementations import register_implementation
from kalmanopt.layers import Layer

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.filters.composition import Composition
    from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["ReferenceImplementation", "SKIP_GRAD_NORM"]

#: a layer whose ‖g_ℓ‖₂ is below this is skipped (no state of it changes)
SKIP_GRAD_NORM = 1e-9


class ReferenceImplementation:
    """The per-layer reference path; supports every composition on every device."""

    name = "reference"

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        return None

    def predict(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
                layers: Sequence[Layer]) -> None:
        f = opt.filter
        for layer in layers:
            f.dynamics.init_layer_state(layer)
        # x̂_k = F x_{k-1}  (the dynamics move θ and the velocities, if any)
        f.dynamics.predict(layers, group_state, group)
        # P̂_k = F P_{k-1} Fᵀ + Q  (for a shared P)
        F, Q = f.dynamics.transition(group_state, group, like=group_state["R"])
        f.surrogate.predict(group_state, F, Q, group)

    def update(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
               layers: Sequence[Layer], loss: Tensor, statistic: Tensor | None) -> None:
        f = opt.filter
        # R_k: fixed, or α_r R_{k-1} + (1 − α_r) s_k, once per step before any layer
        R = f.measurement.noise(group_state, statistic, group)
        F, Q = f.dynamics.transition(group_state, group, like=R)
        ctx = f.surrogate.begin_update(group_state, F, Q, group)
        skipped = 0
        for layer in layers:
            g = layer.grad()
            # a layer without a gradient, or with ‖g_ℓ‖₂ < 1e-9, is skipped
            if g is None or bool(torch.linalg.vector_norm(g) < SKIP_GRAD_NORM):
                skipped += 1
                continue
            f.dynamics.init_layer_state(layer)
            theta = layer.theta()
            # H_ℓ = g_ℓ + wd θ_ℓ;  L_ℓ = L_k + ½ wd ‖θ_ℓ‖²
            H, L = f.measurement.measure(theta, g, loss, group)
            # a layer whose ‖H_ℓ‖² or L_ℓ overflows the state precision is skipped too (finite
            # input must never produce a non-finite parameter); it is counted and warned about
            if not bool(torch.isfinite(torch.stack([torch.dot(H, H), L])).all()):
                skipped += 1
                opt._warn_once("overflow", f"{layer.name}: ‖H‖² or the loss overflows {H.dtype}; the "
                               "layer was skipped (counted in skipped_layers)")
                continue
            # K_ℓ = P̂ H_ℓᵀ / S_ℓ  (the surrogate also stores its per-layer posterior)
            gain = f.surrogate.gain(ctx, layer.state, H, g, R.to(H), group)
            # θ_ℓ ← θ_ℓ − η_k L_ℓ K_ℓ;  with the guard the innovation is max(L_ℓ − L*, 0): a loss
            # below the target L* = 0 does not move θ (the step size is never negative)
            scale = group["lr"] * (L.clamp_min(0.0) if group.get("guard", True) else L)
            layer.write(f.dynamics.correct(layer, theta, gain, scale))
            if opt.track_diagnostics:
                opt._record_layer(layer.name, gain, scale)
        # P_k = (I − K H) P̂_k  (for a shared P)
        f.surrogate.end_update(ctx, group_state, group)
        ctx.count("skipped_layers", skipped)
        opt._record_counters(group_state, ctx.counters)


register_implementation(ReferenceImplementation())
