"""Which compositions the fast paths run, and the per-layer scalar arithmetic they share.

The fast paths follow the :ref:`two-pass <derivation-one-pass>` structure: one pass of per-layer dot products,
then, from those few numbers, per-layer coefficients, then one element-wise pass. This module
holds the middle step (the coefficients, in torch, vectorised over layers) for the multi-tensor
path; the fused path computes the same numbers in a Triton kernel (:mod:`kalmanopt.fast.kernels`).

Per-layer dots, columns of a ``[layers, 8]`` tensor (``DOT_*``):

    hh = H·H,  gg = g·g,  tt = θ·θ  (for L_ℓ when weight decay is on),
    product surrogate:  H·H_{k-1}, H·v_{k-1}, ‖H_{k-1}‖², H_{k-1}·v_{k-1}
    diagonal surrogate: Σ p H²

Every coefficient keeps the reference path's semantics: a skipped layer (‖g‖ < 1e-9, or a
step whose inputs are not finite) gets coefficients that leave its state exactly unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.block import BlockSurrogate
from kalmanopt.covariance.diagonal import DiagonalSurrogate
from kalmanopt.covariance.least_squares import SymmetricLeastSquares, VanillaLeastSquares
from kalmanopt.covariance.product import GUARD_EPS, ProductSurrogate
from kalmanopt.covariance.scalar import ScalarSurrogate
from kalmanopt.dynamics import Momentum, RandomWalk
from kalmanopt.filters.composition import Composition
from kalmanopt.measurement import LossMeasurement
from kalmanopt.reference import SKIP_GRAD_NORM

__all__ = ["surrogate_kind", "unsupported_reason", "KINDS", "DOT_COLUMNS", "product_coefficients",
           "diagonal_coefficients", "shared_coefficients", "noise", "skip_mask", "layer_loss", "step_size",
           "info_code", "CODE_SKIPS", "momentum_covariance_predict"]

#: the surrogates the fast paths run, by the name the kernels use
KINDS = ("product", "diagonal", "scalar", "block")

#: columns of the per-layer dot table
DOT_COLUMNS = 8
DOT_HH, DOT_GG, DOT_TT, DOT_A, DOT_B, DOT_C, DOT_D, DOT_BAD = range(DOT_COLUMNS)


def surrogate_kind(composition: Composition) -> tuple[str | None, str | None]:
    """(kind, None) for a composition the fast paths run, else (None, the reason)."""
    if type(composition.measurement) is not LossMeasurement:
        return None, (f"the fast paths implement the loss measurement only, not "
                      f"{type(composition.measurement).__name__}")
    surrogate, dynamics = composition.surrogate, composition.dynamics
    if type(surrogate) is ProductSurrogate:
        if type(surrogate.estimator) not in (SymmetricLeastSquares, VanillaLeastSquares):
            return None, f"unknown least-squares estimator {type(surrogate.estimator).__name__}"
        kind = "product"
    elif type(surrogate) is DiagonalSurrogate:
        kind = "diagonal"
    elif type(surrogate) is ScalarSurrogate:
        kind = "scalar"
    elif type(surrogate) is BlockSurrogate:
        kind = "block"
    else:
        return None, (f"the {type(surrogate).__name__} runs on the reference path only "
                      "(the fast paths implement the product, diagonal, scalar and 2×2 block surrogates)")
    wanted = Momentum if kind == "block" else RandomWalk
    if type(dynamics) is not wanted:
        return None, f"the fast {kind} surrogate expects {wanted.__name__} dynamics, got {type(dynamics).__name__}"
    return kind, None


def unsupported_reason(composition: Composition, group: Mapping[str, Any]) -> str | None:
    """Why the multi-tensor path cannot run this group, or ``None``."""
    return surrogate_kind(composition)[1]


def symmetric(composition: Composition) -> bool:
    """Whether the product surrogate uses the symmetric least-squares estimate."""
    return type(composition.estimator) is SymmetricLeastSquares


def noise(R: Tensor, statistic: Tensor | None, hp: Mapping[str, Any], ok: Tensor | None) -> Tensor:
    """R_k: fixed ``r``, or R ← α_r R + (1 − α_r) max(s_k, 0) (in place; unchanged where ``ok`` is False).

    Either way at least the smallest normal number of the state precision, so that S_k ≥ R_k > 0.
    """
    new = LossMeasurement.next_noise(R, statistic, hp)
    if hp["r"] is not None:
        return new
    R.copy_(new if ok is None else torch.where(ok, new, R))
    return R


#: bits of the step code: the first three skip the step, the others are reported only
CODE_LOSS, CODE_STATISTIC, CODE_GRADIENT, CODE_NEGATIVE_LOSS, CODE_OVERFLOW = (1, 2, 4, 8, 16)
#: the bits that skip a step
CODE_SKIPS = CODE_LOSS | CODE_STATISTIC | CODE_GRADIENT


def layer_loss(dots: Tensor, loss: Tensor, wd: float) -> Tensor:
    """L_ℓ = L_k + ½ wd ‖θ_ℓ‖²."""
    return loss.to(dots) + 0.5 * wd * dots[:, DOT_TT]


def step_size(L: Tensor, hp: Mapping[str, Any]) -> Tensor:
    """η L_ℓ, with the guard η max(L_ℓ, 0): a loss below the target L* = 0 does not move θ."""
    return float(hp["lr"]) * (L.clamp_min(0.0) if hp.get("guard", True) else L)


def skip_mask(dots: Tensor, L: Tensor, ok: Tensor | None) -> tuple[Tensor, Tensor]:
    """(skip, overflow): layers to skip, and those among them skipped because ‖H‖² or L_ℓ overflows.

    A layer is skipped where ‖g‖₂ < 1e-9, where ‖H_ℓ‖² or L_ℓ is not finite (overflow of the
    state precision), and everywhere when the step's inputs are not finite (``ok`` False).
    """
    small = ~(torch.sqrt(dots[:, DOT_GG]) >= SKIP_GRAD_NORM)
    overflow = ~small & ~(torch.isfinite(dots[:, DOT_HH]) & torch.isfinite(L))
    skip = small | overflow
    return (skip if ok is None else skip | ~ok), overflow


def product_coefficients(dots: Tensor, S_prev: Tensor, R: Tensor, loss: Tensor, ok: Tensor | None,
                         hp: Mapping[str, Any], symmetric_ls: bool) -> tuple[Tensor, ...]:
    """KOALA++ per layer from the five dots: coefficients of v_k and θ_k, S_k, restarts, skips.

    Returns ``(coef, S, restart, skip, overflow)`` with ``coef[:, 0:3] = (a, b, c)`` so that
    v_k = a v_{k-1} + b H_k + c H_{k-1}, and ``coef[:, 3] = d = η L_ℓ / S_k`` so that
    θ_k = θ_{k-1} − d (v_k + Q H_k). ``S`` is the new S (the old one where skipped).
    A layer with S_{k-1} = 0 has had no update yet: it takes the first-update state.
    """
    sigma, q, wd = float(hp["sigma"]), float(hp["q"]), float(hp["weight_decay"])
    hh, hhp, hvp, x, y = (dots[:, i] for i in (DOT_HH, DOT_A, DOT_B, DOT_C, DOT_D))
    first = S_prev == 0
    # first update: v_{k-1} = sigma H_k, H_{k-1} = H_k, S_{k-1} = (v_{k-1} + Q H_{k-1})·H_{k-1} + R_k
    hhp = torch.where(first, hh, hhp)
    hvp = torch.where(first, sigma * hh, hvp)
    x = torch.where(first, hh, x)
    y = torch.where(first, sigma * hh, y)
    S_before = torch.where(first, sigma * hh + q * hh + R, S_prev)
    # λ_k = H_k·(v_{k-1} + Q H_{k-1}) / S_{k-1};  α_k = H_k·H_{k-1} / x
    lam = (hvp + q * hhp) / S_before
    alpha = hhp / x
    # w_k = (H_k·v_{k-1}) / x − y (H_k·H_{k-1}) / x²  (symmetric), 0 (vanilla)
    w = hvp / x - (y / x) * (hhp / x) if symmetric_ls else torch.zeros_like(hh)
    # v_k = (α_k − λ_k) v_{k-1} + Q H_k + (w_k − Q λ_k) H_{k-1}
    a, b, c = alpha - lam, torch.full_like(hh, q), w - q * lam
    # S_k = (v_k + Q H_k)·H_k + R_k
    S = a * hvp + b * hh + c * hhp + q * hh + R
    # on a first update v_{k-1} and H_{k-1} are multiples of H_k: fold them into b
    b = torch.where(first, a * sigma + b + c, b)
    a = torch.where(first, 0.0, a)
    c = torch.where(first, 0.0, c)
    L = layer_loss(dots, loss, wd)
    skip, overflow = skip_mask(dots, L, ok)
    restart = torch.zeros_like(first)
    if hp.get("guard", True):
        # the guard: restart from the first-update state where S_k is not finite or S_k ≤ eps R_k
        restart = ~torch.isfinite(S) | (S <= GUARD_EPS * R)
        S0 = sigma * hh + q * hh + R
        lam0 = (sigma * hh + q * hh) / S0
        b0 = (1.0 - lam0) * sigma + q * (1.0 - lam0)
        S_restart = b0 * hh + q * hh + R
        a = torch.where(restart, 0.0, a)
        b = torch.where(restart, b0, b)
        c = torch.where(restart, 0.0, c)
        S = torch.where(restart, S_restart, S)
        restart = restart & ~skip
        # where even the restart gives no usable S_k, the layer is skipped unchanged
        skip = skip | (restart & (~torch.isfinite(S_restart) | (S_restart <= GUARD_EPS * R)))
    d = torch.where(skip, 0.0, step_size(L, hp) / S)
    coef = torch.stack([torch.where(skip, 1.0, a), torch.where(skip, 0.0, b), torch.where(skip, 0.0, c), d], 1)
    return coef, torch.where(skip, S_prev, S), restart, skip, overflow


def diagonal_coefficients(dots: Tensor, R: Tensor, loss: Tensor, ok: Tensor | None,
                          hp: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Diagonal surrogate: ``coef[:, 0:3] = (q, S, η L_ℓ / S)`` ((0, ∞, 0) where skipped), skips, overflows.

    p̂ = p + q;  S = Σ p̂ H² + R;  θ ← θ − (η L / S) p̂ H;  p ← p̂ (1 − (p̂ H / S) H) clamped at 0
    """
    q, wd = float(hp["q"]), float(hp["weight_decay"])
    # S = Σ p H² + q Σ H² + R
    S = dots[:, DOT_A] + q * dots[:, DOT_HH] + R
    L = layer_loss(dots, loss, wd)
    skip, overflow = skip_mask(dots, L, ok)
    zero = torch.zeros_like(S)
    coef = torch.stack([torch.where(skip, zero, zero + q), torch.where(skip, zero + math.inf, S),
                        torch.where(skip, zero, step_size(L, hp) / S), zero], 1)
    return coef, skip, overflow


def shared_coefficients(dots: Tensor, P: Tensor, R: Tensor, loss: Tensor, ok: Tensor | None,
                        hp: Mapping[str, Any], block: bool) -> tuple[Tensor, Tensor, Tensor]:
    """KOALA-V (scalar P) and KOALA-M (2×2 P): per-layer coefficients; P's posterior in place.

    S_ℓ = P₀₀ ‖H_ℓ‖² + R;  ``coef[:, 0] = η L_ℓ P₀₀ / S_ℓ`` (θ), ``coef[:, 1] = η L_ℓ P₁₀ / S_ℓ``
    (u, block only); then P's posterior over the updated layers: P ← P − P E Pᵀ with
    E₀₀ = max ‖H_ℓ‖² / S_ℓ (block), P ← P (1 − max P ‖H_ℓ‖² / S_ℓ) clamped at 0 (scalar).
    """
    wd = float(hp["weight_decay"])
    p00 = P[0, 0] if block else P
    hh = dots[:, DOT_HH]
    # S_ℓ = P ‖H_ℓ‖² + R
    S = p00 * hh + R
    L = layer_loss(dots, loss, wd)
    skip, overflow = skip_mask(dots, L, ok)
    scale = torch.where(skip, 0.0, step_size(L, hp) / S)
    zero = torch.zeros_like(S)
    coef = torch.stack([scale * p00, scale * P[1, 0] if block else zero, zero, zero], 1)
    if hh.numel():
        if block:
            # E₀₀ = max_ℓ ‖H_ℓ‖² / S_ℓ over the layers that were updated;  P ← P − E₀₀ P[:, 0] P[:, 0]ᵀ
            ratio = torch.where(skip, -math.inf, hh / S).max()
            new = P - ratio * torch.outer(P[:, 0], P[:, 0])
        else:
            # P ← P − P² max_ℓ ‖H_ℓ‖² / S_ℓ, as P (1 − max_ℓ P ‖H_ℓ‖² / S_ℓ) clamped at 0 (an overflowing
            # S_ℓ counts as 1): no overflow, never below 0
            ratio = torch.where(skip, -math.inf, torch.nan_to_num(p00 * hh / S, nan=1.0)).max()
            new = P * (1 - ratio).clamp_min(0.0)
        P.copy_(torch.where(ratio > -math.inf, new, P))
    return coef, skip, overflow


def info_code(code: Tensor | None, overflow: Tensor, loss: Tensor, hp: Mapping[str, Any], ok: Tensor | None,
              device: torch.device) -> Tensor:
    """The step code with the reported-only bits added: a negative loss (guard on), an overflow."""
    if code is None:
        code = torch.zeros((), dtype=torch.int32, device=device)
    info = (overflow.any().to(torch.int32) * CODE_OVERFLOW).to(device)
    if hp.get("guard", True):
        info = info | ((loss < 0).to(device=device, dtype=torch.int32) * CODE_NEGATIVE_LOSS)
    if ok is not None:
        info = info * ok.to(torch.int32)
    return code | info


def momentum_covariance_predict(dist2: Tensor, n_total: int, group_state: dict, hp: Mapping[str, Any],
                                ok: Tensor | None) -> None:
    """KOALA-M's predict of q_w and P from Σ_ℓ ‖w̄_ℓ − θ_ℓ‖² (measured before the weights moved).

    q_w ← 0.9 q_w + 0.1 ‖(‖w̄_ℓ − θ_ℓ‖)_ℓ‖₂ / n_total;  P̂ = F P Fᵀ + diag(q_w, q_v), F = [[1, 1], [0, a]]
    """
    qw, P = group_state["qw"], group_state["P"]
    a, qv = float(hp["a"]), float(hp["qv"])
    # a group whose parameters are all empty keeps q_w (as the reference path does)
    new_qw = 0.9 * qw + 0.1 * torch.sqrt(dist2.to(qw)) / n_total if n_total > 0 else qw.clone()
    p00, p01, p10, p11 = P[0, 0], P[0, 1], P[1, 0], P[1, 1]
    new_P = torch.stack([
        torch.stack([p00 + p10 + p01 + p11 + new_qw, a * (p01 + p11)]),
        torch.stack([a * (p10 + p11), a * a * p11 + qv]),
    ])
    if ok is None:
        qw.copy_(new_qw)
        P.copy_(new_P)
    else:
        qw.copy_(torch.where(ok, new_qw, qw))
        P.copy_(torch.where(ok, new_P, P))
