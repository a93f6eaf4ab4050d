"""The exact extended Kalman filter on problems small enough to hold P (n ≤ ~12), for the tests.

The textbook equations of docs/derivation.md §1 with F = I and Q = q I, in whatever dtype and device the
inputs have:

    predict   P̂_k = P_{k-1} + Q I
    innovate  S_k = H_k P̂_k H_kᵀ + R_k
    gain      K_k = P̂_k H_kᵀ / S_k
    posterior P_k = (I − K_k H_k) P̂_k

plus the problem generators the property tests share (well-conditioned rows, symmetric P).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ExactStep", "exact_step", "random_rows", "random_symmetric", "random_spd", "null_space_projector"]


@dataclass
class ExactStep:
    """One exact EKF step from P_{k-1}: the predicted and posterior covariances, S_k and K_k."""

    P_hat: Tensor
    S: Tensor
    K: Tensor
    P: Tensor


def exact_step(P_prev: Tensor, H: Tensor, q: float | Tensor, R: float | Tensor) -> ExactStep:
    """One EKF step with F = I: P̂ = P + qI, S = H P̂ Hᵀ + R, K = P̂ Hᵀ / S, P = (I − K H) P̂."""
    n = P_prev.shape[0]
    eye = torch.eye(n, dtype=P_prev.dtype, device=P_prev.device)
    # P̂_k = P_{k-1} + Q I
    P_hat = P_prev + q * eye
    # S_k = H_k P̂_k H_kᵀ + R_k
    S = H @ P_hat @ H + R
    # K_k = P̂_k H_kᵀ / S_k
    K = P_hat @ H / S
    # P_k = (I − K_k H_k) P̂_k
    P = (eye - torch.outer(K, H)) @ P_hat
    return ExactStep(P_hat=P_hat, S=S, K=K, P=P)


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def random_rows(seed: int, m: int, n: int, *, cond: float = 10.0, scale: float = 1.0,
                dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Tensor:
    """An m × n matrix (m ≤ n) of full row rank with singular values in [scale/cond, scale]."""
    gen = _generator(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    singular = scale * torch.logspace(0.0, -torch.log10(torch.tensor(cond)).item(), m, dtype=torch.float64)
    return (U @ torch.diag(singular) @ V.T).to(dtype=dtype, device=device)


def random_symmetric(seed: int, n: int, *, dtype: torch.dtype = torch.float64,
                     device: str | torch.device = "cpu") -> Tensor:
    """A symmetric n × n matrix with standard-normal entries (indefinite in general)."""
    B = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    return ((B + B.T) / 2).to(dtype=dtype, device=device)


def random_spd(seed: int, n: int, *, low: float = 0.05, high: float = 1.0, dtype: torch.dtype = torch.float64,
               device: str | torch.device = "cpu") -> Tensor:
    """A symmetric positive-definite n × n matrix with eigenvalues in [low, high]."""
    gen = _generator(seed)
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    P = V @ torch.diag(eig) @ V.T
    return ((P + P.T) / 2).to(dtype=dtype, device=device)


def null_space_projector(A: Tensor) -> Tensor:
    """Π = I − A⁺ A, the orthogonal projector onto the null space of the rows of A (A Π = 0)."""
    n = A.shape[1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    return eye - torch.linalg.pinv(A) @ A
