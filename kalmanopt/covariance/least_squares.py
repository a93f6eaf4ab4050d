"""Least-squares estimators of P_{k-2} from the constraints A P̃ = W .

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
        return self.coefficients_from_dots(gram_inverse, A @ h, W @ h, A @ W.T)

    def coefficients_from_dots(self, gram_inverse: Tensor, Ah: Tensor, Wh: Tensor,
                               AW: Tensor) -> tuple[Tensor, Tensor]:
        # h P̃ = (A h)ᵀ G W  →  a = G A h,  b = 0
        a = (gram_inverse @ Ah[..., None])[..., 0]
        return a, torch.zeros_like(a)

    def matrix(self, A: Tensor, W: Tensor) -> Tensor:
        # P̃ = Aᵀ G W
        return A.T @ torch.linalg.solve(A @ A.T, W)

    def single_coefficients(self, hhp: Tensor, hvp: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # α_k = H_k·H_{k-1} / x;  vanilla: w_k = 0
        return hhp / x, torch.zeros_like(x)


class SymmetricLeastSquares(LeastSquaresEstimator):
    """The minimum-norm symmetric P̃ with A P̃ = W (KOALA++'s default)."""

    symmetric = True

    def coefficients(self, A: Tensor, W: Tensor, h: Tensor, gram_inverse: Tensor) -> tuple[Tensor, Tensor]:
        return self.coefficients_from_dots(gram_inverse, A @ h, W @ h, A @ W.T)

    def coefficients_from_dots(self, gram_inverse: Tensor, Ah: Tensor, Wh: Tensor,
                               AW: Tensor) -> tuple[Tensor, Tensor]:
        G, M = gram_inverse, AW           # M = A Wᵀ (symmetric when a symmetric P̃ exists)
        a = (G @ Ah[..., None])[..., 0]   # coefficient of W:  G A h
        # coefficient of A:  G W h − G Mᵀ G A h
        b = (G @ Wh[..., None])[..., 0] - (G @ (M.mT @ a[..., None]))[..., 0]
        return a, b

    def matrix(self, A: Tensor, W: Tensor) -> Tensor:
        G = torch.linalg.inv(A @ A.T)
        # P̃ = Aᵀ G W + Wᵀ G A − Aᵀ G (A Wᵀ) G A
        return A.T @ G @ W + W.T @ G @ A - A.T @ G @ (A @ W.T) @ G @ A

    def admits(self, A: Tensor, W: Tensor, rtol: float) -> bool:
        return bool(self.admits_from_dots(A @ W.T, rtol))

    def admits_from_dots(self, AW: Tensor, rtol: float) -> Tensor:
        # a symmetric P̃ exists iff M = A Wᵀ is symmetric: ‖M − Mᵀ‖ ≤ rtol ‖M‖
        asym = torch.linalg.matrix_norm(AW - AW.mT)
        return asym <= rtol * torch.linalg.matrix_norm(AW).clamp_min(torch.finfo(AW.dtype).tiny)

    def single_coefficients(self, hhp: Tensor, hvp: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # α_k = H_k·H_{k-1} / x;  w_k = (H_k·v_{k-1}) / x − y (H_k·H_{k-1}) / x²
        #   computed as (H_k·v_{k-1}) / x − (y / x)(H_k·H_{k-1} / x): x² overflows for large gradients
        return hhp / x, hvp / x - (y / x) * (hhp / x)
