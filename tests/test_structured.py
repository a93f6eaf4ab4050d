"""Structured covariance: the Kronecker-factored and the factored surrogate, and the matrix stages under them.

Pinned here: each preset's step equals its derivation (docs/structured.md) on small matrices in float64,
computed independently (explicit Kronecker products and the 4-index rearrangement, not the part's trace
formulas); the factors stay symmetric positive (semi-)definite under any gradient; the update does not
depend on the order of the layers; the state of ``koala-factored`` is O(m + n); a matrix stage that does
not fit its declarations is refused at ``compose``.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kalmanopt
from kalmanopt.composition import Composition
from kalmanopt.covariance.kronecker import KroneckerSurrogate, nearest_left, nearest_right
from kalmanopt.dynamics import RandomWalk
from kalmanopt.matrix import MatrixBlock, MatrixStage
from kalmanopt.measurement import LossMeasurement
from kalmanopt.plan import DeclarationError

ENGINES = ("reference", "foreach")
SIGMA, Q, R, LR = 0.1, 0.1, 0.5, 0.3


def _linear(m: int, n: int, seed: int = 0) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(m, n, generator=g, dtype=torch.float64))


def _step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor], loss: float) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step(loss=torch.tensor(loss, dtype=torch.float64))


# ---------------------------------------------------------------------- the derivations, computed independently
def _nearest_kron_factor(M: torch.Tensor, other: torch.Tensor, m: int, n: int, left: bool) -> torch.Tensor:
    """argmin_X ‖M − X ⊗ other‖ (left) or argmin_Y ‖M − other ⊗ Y‖, from the rearranged 4-index M."""
    M4 = M.reshape(m, n, m, n)
    if left:
        return torch.einsum("ijkl,jl->ik", M4, other) / other.square().sum()
    return torch.einsum("ijkl,ik->jl", M4, other) / other.square().sum()


def _kron_reference(A: torch.Tensor, B: torch.Tensor, theta: torch.Tensor, G: torch.Tensor, loss: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One koala-kron step by its derivation: θ, A, B after it (explicit mn × mn matrices)."""
    m, n = G.shape
    M = torch.kron(A, B) + Q * torch.eye(m * n, dtype=A.dtype)
    A_hat = _nearest_kron_factor(M, B, m, n, left=True)
    B_hat = _nearest_kron_factor(M, A_hat, m, n, left=False)
    P_hat = torch.kron(A_hat, B_hat)
    h = G.reshape(-1)
    d = P_hat @ h
    S = h @ d + R
    theta = theta - LR * loss * (d / S).reshape(m, n)
    M_post = P_hat - torch.outer(d, d) / S
    A_new = _nearest_kron_factor(M_post, B_hat, m, n, left=True)
    B_new = _nearest_kron_factor(M_post, A_new, m, n, left=False)
    return theta, A_new, B_new


def _factored_reference(r: torch.Tensor, c: torch.Tensor, theta: torch.Tensor, G: torch.Tensor, loss: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One koala-factored step by its derivation: θ, r, c after it."""
    p_hat = torch.outer(r, c) / r.mean() + Q
    S = (p_hat * G * G).sum() + R
    theta = theta - LR * loss * p_hat * G / S
    p_post = p_hat * (1 - p_hat * G * G / S)
    return theta, p_post.mean(1), p_post.mean(0)


@pytest.mark.parametrize("engine", ENGINES)
def test_koala_kron_step_equals_its_derivation(engine: str) -> None:
    W = _linear(4, 3)
    opt = kalmanopt.create("koala-kron", [W], lr=LR, q=Q, sigma=SIGMA, r=R, refresh=1, implementation=engine)
    A, B = SIGMA * torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    theta = W.detach().clone()
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        G = torch.randn(4, 3, generator=g, dtype=torch.float64)
        loss = 0.7 + 0.1 * k
        theta, A, B = _kron_reference(A, B, theta, G, loss)
        _step(opt, [W], [G], loss)
        state = opt.state[W]
        torch.testing.assert_close(W.detach(), theta, rtol=1e-10, atol=1e-12)
        # (the pair is rescaled: A ⊗ B is what the derivation fixes)
        torch.testing.assert_close(torch.kron(state["A"], state["B"]), torch.kron(A, B), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_koala_factored_step_equals_its_derivation(engine: str) -> None:
    W = _linear(4, 3)
    opt = kalmanopt.create("koala-factored", [W], lr=LR, q=Q, sigma=SIGMA, r=R, implementation=engine)
    r, c = torch.full((4,), SIGMA, dtype=torch.float64), torch.full((3,), SIGMA, dtype=torch.float64)
    theta = W.detach().clone()
    g = torch.Generator().manual_seed(2)
    for k in range(3):
        G = torch.randn(4, 3, generator=g, dtype=torch.float64)
        loss = 0.9 - 0.1 * k
        theta, r, c = _factored_reference(r, c, theta, G, loss)
        _step(opt, [W], [G], loss)
        state = opt.state[W]
        torch.testing.assert_close(W.detach(), theta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["row"], r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["col"], c, rtol=1e-10, atol=1e-12)


def test_a_vector_parameter_follows_the_diagonal_rule() -> None:
    """A bias is a column (m, 1): koala-factored is then koala-diag exactly; koala-kron keeps diagonal factors."""
    b1 = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
    b2 = torch.nn.Parameter(b1.detach().clone())
    factored = kalmanopt.create("koala-factored", [b1], lr=LR, q=Q, sigma=SIGMA, r=R)
    diagonal = kalmanopt.create("koala-diag", [b2], lr=LR, q=Q, sigma=SIGMA, r=R)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        G = torch.randn(5, generator=g, dtype=torch.float64)
        _step(factored, [b1], [G], 0.5)
        _step(diagonal, [b2], [G], 0.5)
    torch.testing.assert_close(b1.detach(), b2.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(factored.state[b1]["row"] * factored.state[b1]["col"] / factored.state[b1]["row"].mean(),
                               diagonal.state[b2]["p"], rtol=1e-12, atol=1e-14)
    kron = kalmanopt.create("koala-kron", [torch.nn.Parameter(torch.zeros(5))])
    p = kron.param_groups[0]["params"][0]
    _step(kron, [p], [torch.ones(5)], 0.5)
    assert kron.state[p]["A"].shape == (5,) and kron.state[p]["B"].shape == (1,)


def test_factor_shapes_follow_the_matricised_layer() -> None:
    conv = torch.nn.Conv2d(3, 6, 3)  # (out, in · kh · kw) = (6, 27)
    embedding = torch.nn.Embedding(40, 8)
    opt = kalmanopt.create("koala-kron", [conv.weight, embedding.weight], max_dim=32)
    for p in (conv.weight, embedding.weight):
        p.grad = torch.ones_like(p)
    opt.step(loss=torch.tensor(1.0))
    assert opt.state[conv.weight]["A"].shape == (6, 6) and opt.state[conv.weight]["B"].shape == (27, 27)
    # 40 rows > max_dim: the row factor is its diagonal
    assert opt.state[embedding.weight]["A"].shape == (40,) and opt.state[embedding.weight]["B"].shape == (8, 8)


def test_koala_factored_keeps_o_m_plus_n_state() -> None:
    W = torch.nn.Parameter(torch.zeros(64, 48))
    opt = kalmanopt.create("koala-factored", [W])
    W.grad = torch.ones_like(W)
    opt.step(loss=torch.tensor(1.0))
    saved = opt.state_dict()["state"][0]
    assert sum(t.numel() for t in saved.values()) == 64 + 48
    fresh = kalmanopt.create("koala-factored", [W])
    fresh.load_state_dict(opt.state_dict())  # the workspace is made afresh at the next step
    W.grad = torch.ones_like(W)
    fresh.step(loss=torch.tensor(1.0))
    assert torch.isfinite(W).all()


# ---------------------------------------------------------------------- invariants under any gradient
_scales = st.sampled_from([0.0, 1e-30, 1e-8, 1.0, 1e8, 1e30])


def _eigenvalues_ok(X: torch.Tensor, strict: bool) -> bool:
    if X.dim() == 1:
        return bool((X > 0).all()) if strict else bool((X >= 0).all())
    if not torch.allclose(X, X.T, rtol=0, atol=1e-12 * float(X.abs().max())):
        return False
    low = torch.linalg.eigvalsh(X).min()
    return bool(low > 0) if strict else bool(low >= -1e-9 * float(X.abs().max()))


@given(scales=st.lists(_scales, min_size=3, max_size=3), seed=st.integers(0, 2 ** 16),
       shape=st.sampled_from([(4, 3), (2, 5), (6, 1), (1, 4)]))
def test_kron_factors_stay_symmetric_positive_definite(scales: list[float], seed: int, shape: tuple[int, int]) -> None:
    W = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = kalmanopt.create("koala-kron", [W], refresh=1, lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for scale in scales:
        _step(opt, [W], [torch.randn(shape, generator=g, dtype=torch.float64) * scale], 1.0)
        if not opt.state[W]:
            continue  # no update yet (a zero gradient is skipped): no state
        A, B = opt.state[W]["A"], opt.state[W]["B"]
        assert torch.isfinite(A).all() and torch.isfinite(B).all() and torch.isfinite(W).all()
        # the stored posterior is positive semi-definite; the factors the next step uses are positive definite
        assert _eigenvalues_ok(A, strict=False) and _eigenvalues_ok(B, strict=False)
        A_hat = nearest_left(A[None], B[None], Q)
        B_hat = nearest_right(A_hat, A[None], B[None], Q)
        assert _eigenvalues_ok(A_hat[0], strict=True) and _eigenvalues_ok(B_hat[0], strict=True)


@given(scales=st.lists(_scales, min_size=3, max_size=3), seed=st.integers(0, 2 ** 16),
       shape=st.sampled_from([(4, 3), (2, 5), (6, 1)]))
def test_factored_factors_stay_positive(scales: list[float], seed: int, shape: tuple[int, int]) -> None:
    W = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = kalmanopt.create("koala-factored", [W], lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for scale in scales:
        _step(opt, [W], [torch.randn(shape, generator=g, dtype=torch.float64) * scale], 1.0)
        if not opt.state[W]:
            continue  # no update yet (a zero gradient is skipped): no state
        r, c = opt.state[W]["row"], opt.state[W]["col"]
        assert torch.isfinite(r).all() and torch.isfinite(c).all() and torch.isfinite(W).all()
        assert (r >= 0).all() and (c >= 0).all() and r.mean() > 0


@pytest.mark.parametrize("preset", ["koala-kron", "koala-factored"])
@pytest.mark.parametrize("engine", ENGINES)
def test_the_update_does_not_depend_on_the_order_of_layers(preset: str, engine: str) -> None:
    shapes = [(4, 3), (4, 3), (2, 4), (3,), (4, 3)]
    first = [_linear(*s, seed=i) if len(s) == 2 else torch.nn.Parameter(torch.randn(s, dtype=torch.float64))
             for i, s in enumerate(shapes)]
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    order = [3, 1, 4, 0, 2]
    a = kalmanopt.create(preset, first, lr=LR, r=R, implementation=engine)
    b = kalmanopt.create(preset, [second[i] for i in order], lr=LR, r=R, implementation=engine)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in first]
        _step(a, first, grads, 0.8)
        _step(b, [second[i] for i in order], [grads[i] for i in order], 0.8)
    for p, q in zip(first, second):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_a_refresh_interval_holds_the_factors_between_refreshes() -> None:
    W = _linear(3, 2)
    opt = kalmanopt.create("koala-kron", [W], refresh=3)
    seen = []
    for k in range(6):
        _step(opt, [W], [torch.full((3, 2), 0.5 + k, dtype=torch.float64)], 1.0)
        seen.append(opt.state[W]["A"].clone())
    assert not torch.equal(seen[0], SIGMA * torch.eye(3, dtype=torch.float64))  # step 1 refreshes
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])


def test_a_skipped_step_changes_no_factor() -> None:
    W = _linear(3, 2)
    opt = kalmanopt.create("koala-kron", [W], refresh=1)
    _step(opt, [W], [torch.ones(3, 2, dtype=torch.float64)], 1.0)
    before = copy.deepcopy(opt.state[W])
    theta = W.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _step(opt, [W], [torch.full((3, 2), float("nan"), dtype=torch.float64)], 1.0)
    assert torch.equal(W.detach(), theta)
    for key in ("A", "B"):
        assert torch.equal(opt.state[W][key], before[key])


def test_the_parts_compose_by_name() -> None:
    for surrogate in ("kronecker", "factored"):
        composition = kalmanopt.compose(surrogate=surrogate)
        W = torch.nn.Parameter(torch.zeros(3, 2))
        opt = kalmanopt.KalmanOptimizer([W], composition)
        W.grad = torch.ones_like(W)
        opt.step(loss=torch.tensor(1.0))
        assert not torch.equal(W.detach(), torch.zeros(3, 2))


# ---------------------------------------------------------------------- declarations refused at compose
class _Reads(KroneckerSurrogate):
    def matrix_stages(self, hp: Mapping[str, Any]) -> tuple[MatrixStage, ...]:
        stages = super().matrix_stages(hp)
        return (MatrixStage("predict", stages[0].run, "before", reads=("Hx",), writes=("D",), factors=("A", "B")),
                stages[1])


class _WrongShape(KroneckerSurrogate):
    def matrix_stages(self, hp: Mapping[str, Any]) -> tuple[MatrixStage, ...]:
        def flat(block: MatrixBlock) -> None:
            block.out["D"] = block.x["H"].flatten(1)

        return (MatrixStage("predict", flat, "before", reads=("H",), writes=("D",)),)


class _Undeclared(KroneckerSurrogate):
    def matrix_stages(self, hp: Mapping[str, Any]) -> tuple[MatrixStage, ...]:
        stages = super().matrix_stages(hp)
        return (stages[0], MatrixStage("posterior", stages[1].run, "after", reads=(), factors=("A", "B"),
                                       coefficients=("S_missing",)))


@pytest.mark.parametrize("surrogate, message", [
    (_Reads, "matrix stage 'predict' reads the vector 'Hx'"),
    (_WrongShape, "made 'D' of shape \\(2, 6\\); it must be \\[layers, m, n\\]"),
    (_Undeclared, "reads the coefficient 'S_missing', which no part provides"),
])
def test_a_matrix_stage_that_does_not_fit_is_refused_at_compose(surrogate: type, message: str) -> None:
    with pytest.raises(DeclarationError, match=message):
        Composition(LossMeasurement(), RandomWalk(), surrogate(), name="broken")


def test_a_before_stage_cannot_read_coefficients() -> None:
    with pytest.raises(ValueError, match="when='after'"):
        MatrixStage("early", lambda block: None, "before", coefficients=("S",))
