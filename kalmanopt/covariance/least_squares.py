"""Least-squares estimators of P_{k-2} from the constraints A P̃ = W (:ref:`derivation §6 <derivation-least-squares>`).

With A the stacked rows (H_{k-1}, ..., H_{k-m}) and W their products with P_{k-2}, and
G = (A Aᵀ)⁻¹:

- vanilla (minimum Frobenius norm):   P̃ = Aᵀ G W
- symmetric (minimum norm among symmetric P̃, which exists iff A Wᵀ is symmetric):
      P̃ = Aᵀ G W + Wᵀ G A − Aᵀ G (A Wᵀ) G A

For m = 1 (KOALA++): x = ‖H_{k-1}‖², y = H_{k-1}·v_{k-1}, and
vanilla P̃ = H_{k-1}ᵀ v_{k-1} / x, symmetric P̃ = (H_{k-1}ᵀ v_{k-1} + v_{k-1}ᵀ H_{k-1}) / x − y H_{k-1}ᵀ H_{k-1} / x².
"""

from __future__ import annotations

import torch
from torch import Tensor

from kalmanopt.covariance.base import LeastSquaresEstimator

__all__ = ["VanillaLeastSquares", "SymmetricLeastSquares"]


class VanillaLeastSquares(LeastSquaresEstimator):
    """P̃ = Aᵀ (A Aᵀ)⁻¹ W: the minimum-Frobenius-norm solution (the paper's "NS" ablation)."""

    symmetric = False

    def coefficients(self, A: Tensor, W: Tensor, h: Tensor, gram_inverse: Tensor) -> tuple[Tensor, Tensor]:
        # h P̃ = (A h)ᵀ G W  →  a = G A h,  b = 0
        a = gram_inverse @ (A @ h)
        return a, torch.zeros_like(a)

    def matrix(self, A: Tensor, W: Tensor) -> Tensor:
        # P̃ = Aᵀ G W
        return A.T @ torch.linalg.solve(A @ A.T, W)

    def _single_w(self, H: Tensor, H_prev: Tensor, v_prev: Tensor, x: Tensor) -> Tensor:
        # vanilla: w_k = 0
        return torch.zeros_like(x)


class SymmetricLeastSquares(LeastSquaresEstimator):
    """The minimum-norm symmetric P̃ with A P̃ = W (KOALA++'s default)."""

    symmetric = True

    def coefficients(self, A: Tensor, W: Tensor, h: Tensor, gram_inverse: Tensor) -> tuple[Tensor, Tensor]:
        G = gram_inverse
        M = A @ W.T                       # M = A Wᵀ (symmetric when a symmetric P̃ exists)
        a = G @ (A @ h)                   # coefficient of W:  G A h
        # coefficient of A:  G W h − G Mᵀ G A h
        b = G @ (W @ h) - G @ (M.T @ a)
        return a, b

    def matrix(self, A: Tensor, W: Tensor) -> Tensor:
        G = torch.linalg.inv(A @ A.T)
        # P̃ = Aᵀ G W + Wᵀ G A − Aᵀ G (A Wᵀ) G A
        return A.T @ G @ W + W.T @ G @ A - A.T @ G @ (A @ W.T) @ G @ A

    def admits(self, A: Tensor, W: Tensor, rtol: float) -> bool:
        M = A @ W.T
        asym = torch.linalg.matrix_norm(M - M.T)
        return bool(asym <= rtol * torch.linalg.matrix_norm(M).clamp_min(torch.finfo(M.dtype).tiny))

    def _single_w(self, H: Tensor, H_prev: Tensor, v_prev: Tensor, x: Tensor) -> Tensor:
        # y = H_{k-1}·v_{k-1};  w_k = (H_k·v_{k-1}) / x − y (H_k·H_{k-1}) / x²
        #   computed as (H_k·v_{k-1}) / x − (y / x)(H_k·H_{k-1} / x): x² overflows for large gradients
        y = torch.dot(H_prev, v_prev)
        return torch.dot(H, v_prev) / x - (y / x) * (torch.dot(H, H_prev) / x)
