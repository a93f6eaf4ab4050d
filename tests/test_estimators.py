"""Properties of the least-squares estimators (docs/derivation.md §6): A P̃ = W at minimum Frobenius norm.

For rows A (m × n, full row rank) and products W, the vanilla estimator returns the
minimum-norm P̃ with A P̃ = W, the symmetric one the minimum-norm symmetric P̃ (which exists when
A Wᵀ is symmetric, e.g. W = A P for a symmetric P). Both are checked against their definition:
the constraints hold, and every other solution of the same kind, P̃ + N with A N = 0, is farther
from zero — by Pythagoras, ‖P̃ + N‖² = ‖P̃‖² + ‖N‖², since P̃ is orthogonal to the null-space term.
"""

from __future__ import annotations

import pytest
import torch
from exact_ekf import null_space_projector, random_rows, random_symmetric
from hypothesis import given, settings
from hypothesis import strategies as st

from kalmanopt.covariance import SymmetricLeastSquares, VanillaLeastSquares

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ESTIMATORS = [VanillaLeastSquares(), SymmetricLeastSquares()]
RTOL = 1e-10
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw: st.DrawFn, min_extra: int = 1) -> tuple[int, int, int, float]:
    """(seed, m, n, scale): m rows of n ≥ 2m + min_extra entries, singular values ~ scale."""
    m = draw(st.integers(1, 4))
    n = draw(st.integers(2 * m + min_extra, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-3, 3))
    return seed, m, n, scale


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool(torch.linalg.norm(got - want) <= rtol * max(float(torch.linalg.norm(want)), 1e-300))


def _problem(seed: int, m: int, n: int, scale: float, device: str, *, symmetric: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A, W, P): W = A P for a random symmetric P when ``symmetric``, else W random (P None)."""
    A = random_rows(seed, m, n, scale=scale, device=device)
    if symmetric:
        P = random_symmetric(seed + 1, n, device=device)
        return A, A @ P, P
    gen = torch.Generator().manual_seed(seed + 2)
    return A, torch.randn(m, n, generator=gen, dtype=torch.float64).to(device), None


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(problem=problems())
def test_vanilla_solution_satisfies_constraints_and_has_minimum_norm(device, problem):
    seed, m, n, scale = problem
    A, W, _ = _problem(seed, m, n, scale, device, symmetric=False)
    P_tilde = VanillaLeastSquares().matrix(A, W)
    assert _close(A @ P_tilde, W)
    # any other solution: P̃ + Π Z with A Π = 0
    Z = torch.randn(n, n, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64).to(device)
    N = null_space_projector(A) @ Z
    assert float(torch.linalg.norm(A @ N)) <= 1e-10 * float(torch.linalg.norm(A) * torch.linalg.norm(N))
    norm2, other2, null2 = (float(torch.linalg.norm(X) ** 2) for X in (P_tilde, P_tilde + N, N))
    assert other2 == pytest.approx(norm2 + null2, rel=1e-9)
    assert other2 > norm2


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(problem=problems())
def test_symmetric_solution_is_symmetric_satisfies_constraints_and_has_minimum_norm(device, problem):
    seed, m, n, scale = problem
    A, W, P = _problem(seed, m, n, scale, device, symmetric=True)
    P_tilde = SymmetricLeastSquares().matrix(A, W)
    assert _close(P_tilde, P_tilde.T, rtol=1e-12)
    assert _close(A @ P_tilde, W)
    # P itself is a symmetric solution, so the minimum-norm one is no larger
    assert float(torch.linalg.norm(P_tilde)) <= float(torch.linalg.norm(P)) * (1 + 1e-12)
    # any other symmetric solution: P̃ + Π Z Π with Z symmetric
    Z = random_symmetric(seed + 3, n, device=device)
    Pi = null_space_projector(A)
    N = Pi @ Z @ Pi
    norm2, other2, null2 = (float(torch.linalg.norm(X) ** 2) for X in (P_tilde, P_tilde + N, N))
    assert other2 == pytest.approx(norm2 + null2, rel=1e-9)
    assert other2 > norm2


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(problem=problems())
def test_estimate_has_rank_at_most_m_vanilla_and_2m_symmetric(device, problem):
    seed, m, n, scale = problem
    for estimator, bound in ((VanillaLeastSquares(), m), (SymmetricLeastSquares(), 2 * m)):
        A, W, _ = _problem(seed, m, n, scale, device, symmetric=estimator.symmetric)
        P_tilde = estimator.matrix(A, W)
        singular = torch.linalg.svdvals(P_tilde)
        assert int((singular > 1e-9 * singular[0]).sum()) <= bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: type(e).__name__)
@SETTINGS
@given(problem=problems(min_extra=0))
def test_coefficients_give_h_times_estimate(device, estimator, problem):
    seed, m, n, scale = problem
    A, W, _ = _problem(seed, m, n, scale, device, symmetric=estimator.symmetric)
    h = torch.randn(n, generator=torch.Generator().manual_seed(seed + 4), dtype=torch.float64).to(device)
    a, b = estimator.coefficients(A, W, h, torch.linalg.inv(A @ A.T))
    # h P̃ = aᵀ W + bᵀ A
    assert _close(a @ W + b @ A, h @ estimator.matrix(A, W), rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: type(e).__name__)
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), scale_exp=st.integers(-3, 3))
def test_single_equals_coefficients_with_one_row(device, estimator, seed, n, scale_exp):
    gen = torch.Generator().manual_seed(seed)
    H, H_prev, v_prev = (10.0**scale_exp * torch.randn(n, generator=gen, dtype=torch.float64).to(device)
                         for _ in range(3))
    A, W = H_prev[None], v_prev[None]
    alpha, w = estimator.single(H, H_prev, v_prev)
    a, b = estimator.coefficients(A, W, H, torch.linalg.inv(A @ A.T))
    x = torch.dot(H_prev, H_prev)
    # α and w are sums of products that may cancel: compare against the size of their terms
    assert abs(float(alpha - a[0])) <= 1e-10 * float(torch.linalg.norm(H) * torch.linalg.norm(H_prev) / x)
    assert abs(float(w - b[0])) <= 1e-10 * float(torch.linalg.norm(H) * torch.linalg.norm(v_prev) / x)
    # and both are the one-row estimate: H_k P̃ = α v_{k-1} + w H_{k-1}
    assert _close(alpha * v_prev + w * H_prev, H @ estimator.matrix(A, W), rtol=1e-9)


@SETTINGS
@given(problem=problems(min_extra=0).filter(lambda p: p[1] >= 2))
def test_symmetric_estimator_admits_exactly_the_consistent_products(problem):
    seed, m, n, scale = problem
    estimator = SymmetricLeastSquares()
    A, W, _ = _problem(seed, m, n, scale, "cpu", symmetric=True)
    assert estimator.admits(A, W, rtol=1e-8)
    # random products: A Wᵀ is not symmetric, so no symmetric P̃ satisfies A P̃ = W
    _, W_random, _ = _problem(seed, m, n, scale, "cpu", symmetric=False)
    assert not estimator.admits(A, W_random, rtol=1e-8)
