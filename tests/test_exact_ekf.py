"""The surrogates against the exact EKF on problems small enough to hold P (n ≤ 12).

Each surrogate is driven directly through ``gain`` with a hand-made ``UpdateContext`` and layer
state, so the test controls the state it starts from (v_{k-1}, H_{k-1}, S_{k-1}, the older rows),
and compared with :func:`exact_ekf.exact_step` wherever the surrogate's assumptions hold:

- product (KOALA++): v_k = H_k P_{k-1} whenever the least-squares estimate of H_k P_{k-2} is exact
  (H_k parallel to H_{k-1}); with the symmetric estimator, a step is always one exact EKF step from
  the estimate P̃ in place of P_{k-2};
- low-rank (memory m): the same with H_k in the span of the m kept rows, and the carried products
  H_j P_{k-1} stay exact; its estimate has rank ≤ 2m;
- diagonal: exact when P is diagonal and H has one non-zero entry;
- scalar: S is the exact EKF's with P = p I.
"""

from __future__ import annotations

import pytest
import torch
from exact_ekf import exact_step, random_rows, random_spd, random_symmetric
from hypothesis import given, settings
from hypothesis import strategies as st

from kalmanopt.covariance import (
    DiagonalSurrogate,
    LowRankSurrogate,
    ProductSurrogate,
    ScalarSurrogate,
    SymmetricLeastSquares,
    UpdateContext,
    VanillaLeastSquares,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ESTIMATORS = [VanillaLeastSquares(), SymmetricLeastSquares()]
RTOL = 1e-9
SETTINGS = settings(max_examples=20, deadline=None)
DT = torch.float64

seeds = st.integers(0, 2**31 - 1)
process_noise = st.sampled_from([0.0, 1e-3, 0.1, 1.0])
measurement_noise = st.sampled_from([1e-2, 0.3, 1.0, 5.0])


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> bool:
    """‖got − want‖ ≤ rtol ‖want‖ (absolute below 1e-300)."""
    return bool(torch.linalg.norm(got - want) <= rtol * max(float(torch.linalg.norm(want)), 1e-300))


def _context(q: float, device: str, group_state: dict | None = None) -> UpdateContext:
    """The context a random-walk update gives the surrogate: F = 1, Q = (q,)."""
    F = torch.ones((1, 1), dtype=DT, device=device)
    Q = torch.full((1,), q, dtype=DT, device=device)
    return UpdateContext(group_state={} if group_state is None else group_state, F=F, Q=Q)


def _gain_vector(gain) -> torch.Tensor:
    """K_θ = coefficients[0] · direction."""
    return gain.coefficients[0] * gain.direction


def _randn(seed: int, *shape: int, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT).to(device)


def _term_scale(rows: torch.Tensor, P_hat_prev: torch.Tensor, q: float) -> float:
    """‖rows‖ (‖P̂_{k-1}‖ + q √n): the size of the terms rows · P_{k-1} and rows · P̂_k are sums of.

    P_{k-1} = P̂_{k-1} − P̂_{k-1}H_{k-1}ᵀH_{k-1}P̂_{k-1} / S_{k-1} cancels along directions the filter
    has measured well, so products with it are judged against the size of their terms.
    """
    n = P_hat_prev.shape[0]
    return float(torch.linalg.norm(rows) * (torch.linalg.norm(P_hat_prev) + q * n**0.5))


def _assert_step_matches(gain, v: torch.Tensor, H: torch.Tensor, P_prev: torch.Tensor, P_hat_prev: torch.Tensor,
                         q: float, R: float) -> None:
    """The surrogate's step k equals the exact EKF step from P_{k-1} = ``P_prev``.

    v_k = H_k P_{k-1};  direction P̂_k H_kᵀ;  S_k = H_k P̂_k H_kᵀ + R;  K_k = P̂_k H_kᵀ / S_k.
    """
    step = exact_step(P_prev, H, q, R)
    scale = _term_scale(H, P_hat_prev, q)
    assert float(torch.linalg.norm(v - H @ P_prev)) <= RTOL * scale
    assert float(torch.linalg.norm(gain.direction - step.P_hat @ H)) <= RTOL * scale
    assert abs(float(gain.S - step.S)) <= RTOL * (float(torch.linalg.norm(H)) * scale + R)
    assert float(gain.coefficients[0] * gain.S) == pytest.approx(1.0, rel=1e-14)


# ----------------------------------------------------------------------------- product (KOALA++)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: type(e).__name__)
@SETTINGS
@given(seed=seeds, n=st.integers(1, 12), q=process_noise, R=measurement_noise,
       factors=st.lists(st.floats(0.1, 10.0) | st.floats(-10.0, -0.1), min_size=1, max_size=4))
def test_product_surrogate_matches_exact_ekf_when_H_k_is_parallel_to_H_k_minus_1(
        device, estimator, seed, n, q, R, factors):
    # an exact start: any symmetric P_{k-2}, v_{k-1} = H_{k-1} P_{k-2}, S_{k-1} of the exact step k-1
    P = random_spd(seed, n, device=device)
    H_prev = _randn(seed + 1, n, device=device)
    step = exact_step(P, H_prev, q, R)
    state = {"v": H_prev @ P, "H": H_prev.clone(), "S": step.S}
    surrogate = ProductSurrogate(estimator)
    for c in factors:
        H = c * state["H"]
        gain = surrogate.gain(_context(q, device), state, H, H, torch.tensor(R, dtype=DT, device=device),
                              {"sigma": 0.1, "guard": False})
        _assert_step_matches(gain, state["v"], H, step.P, step.P_hat, q, R)
        step = exact_step(step.P, H, q, R)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=seeds, n=st.integers(1, 12), q=process_noise, R=measurement_noise)
def test_symmetric_product_step_is_one_exact_ekf_step_from_its_estimate(device, seed, n, q, R):
    # any symmetric P_{k-2} and any H_k: the surrogate replaces P_{k-2} by the minimum-norm symmetric
    # P̃ with H_{k-1} P̃ = v_{k-1}; from there on the step is exact
    P = random_spd(seed, n, device=device)
    H_prev, H = _randn(seed + 1, n, device=device), _randn(seed + 2, n, device=device)
    v_prev = H_prev @ P
    S_prev = exact_step(P, H_prev, q, R).S
    state = {"v": v_prev, "H": H_prev.clone(), "S": S_prev}
    gain = ProductSurrogate(SymmetricLeastSquares()).gain(
        _context(q, device), state, H, H, torch.tensor(R, dtype=DT, device=device), {"sigma": 0.1, "guard": False})
    P_tilde = SymmetricLeastSquares().matrix(H_prev[None], v_prev[None])
    previous = exact_step(P_tilde, H_prev, q, R)
    # H_{k-1} P̃ H_{k-1}ᵀ = H_{k-1} P_{k-2} H_{k-1}ᵀ: the stored S_{k-1} is also the estimate's
    assert float(previous.S) == pytest.approx(float(S_prev), rel=RTOL)
    _assert_step_matches(gain, state["v"], H, previous.P, previous.P_hat, q, R)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=seeds, n=st.integers(2, 12), sigma=st.sampled_from([1e-3, 0.1, 1.0]), q=process_noise,
       R=measurement_noise)
def test_product_surrogate_first_update_is_exact_ekf_from_sigma_identity_measured_twice(device, seed, n, sigma,
                                                                                         q, R):
    # the first update's stand-in state (v = σ H_k, H_{k-1} = H_k, S_{k-1} = (σ + Q)‖H_k‖² + R) is
    # the exact EKF from P = σ I that measured H_k once before
    H = _randn(seed, n, device=device)
    stand_in = exact_step(sigma * torch.eye(n, dtype=DT, device=device), H, q, R)
    for estimator in ESTIMATORS:
        state: dict = {}
        gain = ProductSurrogate(estimator).gain(_context(q, device), state, H, H,
                                                torch.tensor(R, dtype=DT, device=device), {"sigma": sigma})
        _assert_step_matches(gain, state["v"], H, stand_in.P, stand_in.P_hat, q, R)


# ----------------------------------------------------------------------------- low rank (memory m)
def _lowrank_state(A: torch.Tensor, W: torch.Tensor, S_prev: torch.Tensor, memory: int) -> dict:
    """The layer state at the start of step k: H_{k-1} = A[0], v_{k-1} = W[0], the older rows after."""
    state = {"v": W[0].clone(), "H": A[0].clone(), "S": S_prev,
             "rows_kept": torch.tensor(A.shape[0] - 1, device=A.device)}
    for j in range(1, memory):  # row{j}, prod{j}: the older rows and their products (zeros past the kept ones)
        state[f"row{j}"] = A[j].clone() if j < A.shape[0] else A.new_zeros(A.shape[1])
        state[f"prod{j}"] = W[j].clone() if j < W.shape[0] else W.new_zeros(W.shape[1])
    return state


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=seeds, memory=st.integers(1, 4), extra=st.integers(0, 6), q=process_noise, R=measurement_noise,
       steps=st.integers(1, 5))
def test_lowrank_keeps_all_constraints_exact_when_H_k_lies_in_the_span_of_the_kept_rows(
        device, seed, memory, extra, q, R, steps):
    n = memory + 1 + extra
    P = random_spd(seed, n, device=device)
    A = random_rows(seed + 1, memory, n, device=device)   # H_{k-1}, ..., H_{k-m}
    # the state at step k: every product with P_{k-2}, S_{k-1} of the exact step k-1
    step = exact_step(P, A[0], q, R)
    state = _lowrank_state(A, A @ P, step.S, memory)
    surrogate = LowRankSurrogate(SymmetricLeastSquares(), memory=memory)
    rows = A.clone()
    for j in range(steps):
        # H_k in the span of the kept rows: the oldest one, which it replaces, mixed with the others,
        # so that the kept rows stay well conditioned (no drop) and always span the rows of A
        H = 1.3 * rows[-1] + 0.3 * _randn(seed + 10 + j, memory, device=device) @ rows
        rows = torch.cat([H[None], rows[:-1]])
        ctx = _context(q, device)
        gain = surrogate.gain(ctx, state, H, H, torch.tensor(R, dtype=DT, device=device), {"sigma": 0.1})
        assert ctx.counters.get("rows_dropped", 0) == 0
        assert ctx.counters.get("guard_restarts", 0) == 0
        _assert_step_matches(gain, state["v"], H, step.P, step.P_hat, q, R)
        # every kept older row's product is carried to P_{k-1} exactly: H_j P_{k-1}
        kept = int(state["rows_kept"])
        assert kept == memory - 1
        older, products = surrogate.older_rows(state)
        assert torch.equal(older, rows[1:])
        assert float(torch.linalg.norm(products - older @ step.P)) <= RTOL * _term_scale(older, step.P_hat, q)
        step = exact_step(step.P, H, q, R)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=seeds, memory=st.integers(1, 4), extra=st.integers(1, 6), q=process_noise, R=measurement_noise)
def test_lowrank_step_is_one_exact_ekf_step_from_a_rank_2m_estimate(device, seed, memory, extra, q, R):
    # any H_k: the surrogate replaces P_{k-2} by the minimum-norm symmetric P̃ with A P̃ = W
    n = 2 * memory + extra
    P = random_spd(seed, n, device=device)
    A = random_rows(seed + 1, memory, n, device=device)
    W = A @ P
    state = _lowrank_state(A, W, exact_step(P, A[0], q, R).S, memory)
    H = _randn(seed + 2, n, device=device)
    gain = LowRankSurrogate(SymmetricLeastSquares(), memory=memory).gain(
        _context(q, device), state, H, H, torch.tensor(R, dtype=DT, device=device), {"sigma": 0.1, "guard": False})
    P_tilde = SymmetricLeastSquares().matrix(A, W)
    singular = torch.linalg.svdvals(P_tilde)
    assert int((singular > 1e-9 * singular[0]).sum()) <= 2 * memory
    previous = exact_step(P_tilde, A[0], q, R)
    _assert_step_matches(gain, state["v"], H, previous.P, previous.P_hat, q, R)


@pytest.mark.parametrize("memory", [2, 3])
def test_lowrank_counts_a_dropped_row_for_each_repeated_gradient(memory):
    H = _randn(0, 6, device="cpu")
    surrogate = LowRankSurrogate(SymmetricLeastSquares(), memory=memory)
    state: dict = {}
    drops = []
    for _ in range(6):
        ctx = _context(0.1, "cpu")
        surrogate.gain(ctx, state, H, H, torch.tensor(1.0, dtype=DT), {"sigma": 0.1})
        drops.append(ctx.counters.get("rows_dropped", 0))
    # step 1 starts from the stand-in state (no older rows kept), step 2 has one row; from step 3 on
    # the one older row duplicates H_{k-1} and is dropped (so no more than one row is ever kept)
    assert drops == [0, 0, 1, 1, 1, 1]
    assert int(state["rows_kept"]) == 1


@pytest.mark.parametrize("ratio, drops", [(1e-6, 1), (1e-2, 0)])
def test_lowrank_keeps_and_drops_the_same_rows_in_float32_and_float64(ratio, drops):
    # two kept rows whose Gram matrix has λ_min / λ_max ≈ ratio; the decision must not depend on the
    # state precision (a float64 run is the oracle of the float32 one)
    n = 5
    angle = 2 * ratio**0.5
    A = torch.zeros(2, n, dtype=DT)
    A[0, 0], A[1, 0], A[1, 1] = 1.0, 1.0, angle
    P = random_spd(3, n)
    H = _randn(4, n, device="cpu")
    for dtype in (torch.float64, torch.float32):
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in _lowrank_state(A, A @ P, exact_step(P, A[0], 0.1, 1.0).S, 2).items()}
        ctx = UpdateContext(group_state={}, F=torch.ones((1, 1), dtype=dtype), Q=torch.full((1,), 0.1, dtype=dtype))
        LowRankSurrogate(SymmetricLeastSquares(), memory=2).gain(ctx, state, H.to(dtype), H.to(dtype),
                                                                 torch.tensor(1.0, dtype=dtype), {"sigma": 0.1})
        assert ctx.counters.get("rows_dropped", 0) == drops, dtype


def test_lowrank_drops_no_row_on_a_generic_sequence():
    surrogate = LowRankSurrogate(SymmetricLeastSquares(), memory=3)
    state: dict = {}
    for k in range(8):
        ctx = _context(0.1, "cpu")
        H = _randn(k, 6, device="cpu")
        surrogate.gain(ctx, state, H, H, torch.tensor(1.0, dtype=DT), {"sigma": 0.1})
        assert ctx.counters.get("rows_dropped", 0) == 0, f"step {k + 1}"
    assert int(state["rows_kept"]) == 2


# ----------------------------------------------------------------------------- diagonal
@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=seeds, n=st.integers(1, 12), q=process_noise, R=measurement_noise,
       measurements=st.lists(st.tuples(st.integers(0, 11), st.floats(-10.0, 10.0)), min_size=1, max_size=6))
def test_diagonal_posterior_equals_exact_ekf_when_P_is_diagonal_and_H_has_one_nonzero_entry(
        device, seed, n, q, R, measurements):
    p = 0.05 + torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=DT).to(device)
    state = {"p": p.clone()}
    P = torch.diag(p)
    for index, value in measurements:
        H = torch.zeros(n, dtype=DT, device=device)
        H[index % n] = value
        gain = DiagonalSurrogate().gain(_context(q, device), state, H, H, torch.tensor(R, dtype=DT, device=device),
                                        {"sigma": 0.1})
        step = exact_step(P, H, q, R)
        # the exact posterior stays diagonal, and its diagonal is the surrogate's p
        assert _close(step.P, torch.diag(torch.diagonal(step.P)), rtol=1e-14)
        # p = p̂ − (p̂ ∘ H)² / S cancels where a coordinate is measured often: judge it against p̂
        assert bool(torch.all((state["p"] - torch.diagonal(step.P)).abs() <= 1e-12 * torch.diagonal(step.P_hat)))
        assert float(gain.S) == pytest.approx(float(step.S), rel=1e-12)
        assert _close(_gain_vector(gain), step.K, rtol=1e-12)
        P = step.P


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=seeds, n=st.integers(1, 12), q=process_noise, R=measurement_noise)
def test_diagonal_S_and_gain_equal_exact_ekf_with_diagonal_P_for_any_H(device, seed, n, q, R):
    p = 0.05 + torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=DT).to(device)
    H = _randn(seed + 1, n, device=device)
    gain = DiagonalSurrogate().gain(_context(q, device), {"p": p.clone()}, H, H,
                                    torch.tensor(R, dtype=DT, device=device), {"sigma": 0.1})
    step = exact_step(torch.diag(p), H, q, R)
    assert float(gain.S) == pytest.approx(float(step.S), rel=1e-12)
    assert _close(_gain_vector(gain), step.K, rtol=1e-12)


# ----------------------------------------------------------------------------- scalar
@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=seeds, sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4), sigma=st.floats(1e-3, 10.0),
       q=process_noise, R=measurement_noise)
def test_scalar_S_equals_exact_ekf_with_P_equal_p_times_identity(device, seed, sizes, sigma, q, R):
    surrogate = ScalarSurrogate(direction="measurement")
    hp = {"sigma": sigma}
    group_state: dict = {}
    surrogate.init_group_state(group_state, hp, DT, torch.device(device))
    ctx = _context(q, device, group_state)
    surrogate.predict(group_state, ctx.F, ctx.Q, hp)
    ctx = surrogate.begin_update(group_state, ctx.F, ctx.Q, hp)
    posteriors = []
    for i, n in enumerate(sizes):
        H = _randn(seed + i, n, device=device)
        gain = surrogate.gain(ctx, {}, H, H, torch.tensor(R, dtype=DT, device=device), hp)
        step = exact_step(sigma * torch.eye(n, dtype=DT, device=device), H, q, R)
        # S_ℓ = H_ℓ (p + q) I H_ℓᵀ + R;  K_ℓ = (p + q) H_ℓ / S_ℓ along H_ℓ (direction="measurement")
        assert float(gain.S) == pytest.approx(float(step.S), rel=1e-12)
        assert _close(_gain_vector(gain), step.K, rtol=1e-12)
        # the exact posterior's variance along H_ℓ
        posteriors.append(float(H @ step.P @ H / (H @ H)))
    surrogate.end_update(ctx, group_state, hp)
    # the shared posterior keeps the smallest of them (the largest ‖H_ℓ‖² / S_ℓ)
    assert float(group_state["P"]) == pytest.approx(min(posteriors), rel=1e-10)


def test_scalar_gradient_direction_steps_along_g_not_H():
    # the released KOALA-V applies the raw gradient g; with weight decay, H = g + wd θ differs from it
    surrogate = ScalarSurrogate(direction="gradient")
    hp = {"sigma": 0.5}
    group_state: dict = {}
    surrogate.init_group_state(group_state, hp, DT, torch.device("cpu"))
    ctx = _context(0.1, "cpu", group_state)
    g, H = _randn(0, 5, device="cpu"), _randn(1, 5, device="cpu")
    gain = surrogate.gain(ctx, {}, H, g, torch.tensor(1.0, dtype=DT), hp)
    S = 0.5 * (H @ H) + 1.0
    assert float(gain.S) == pytest.approx(float(S), rel=1e-14)
    assert _close(_gain_vector(gain), 0.5 * g / S, rtol=1e-14)


# ----------------------------------------------------------------------------- general symmetric P
@SETTINGS
@given(seed=seeds, n=st.integers(2, 10), q=st.sampled_from([2.0, 5.0]), R=measurement_noise)
def test_product_surrogate_parallel_case_holds_for_indefinite_symmetric_P(seed, n, q, R):
    # the recursion uses only the symmetry of P, not its definiteness
    P = 0.3 * random_symmetric(seed, n) / n**0.5
    H_prev = _randn(seed + 1, n, device="cpu")
    step = exact_step(P, H_prev, q, R)
    state = {"v": H_prev @ P, "H": H_prev.clone(), "S": step.S}
    H = -1.7 * H_prev
    gain = ProductSurrogate().gain(_context(q, "cpu"), state, H, H, torch.tensor(R, dtype=DT),
                                   {"sigma": 0.1, "guard": False})
    _assert_step_matches(gain, state["v"], H, step.P, step.P_hat, q, R)
