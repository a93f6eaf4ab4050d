"""The gradient-measurement parts (koala-adam): the exact per-coordinate filter, the steady state, errors.

- riccati: one step of the adaptive diagonal surrogate is the exact Kalman update of a diagonal P
  by n gradient measurements with information diag(λ) (full matrices, float64);
- newton: on a loss with a constant gradient the covariance reaches the steady state of the Riccati
  recursion, and the step there is Adam's, η m / √v, per coordinate (the recursion itself gets there
  too, but a coordinate far below its layer's mean information needs ~√(1/(q λ)) steps);
- steady: each step's covariance is the fixed point of the recursion at that step's information,
  and it is the limit the Newton iteration reaches;
- the layer sum Σv that the coefficients read is carried as layer state and equals the sum of the
  stored v through skipped layers and missing gradients, for every covariance update;
- the decaying random walk is AdamW's decoupled decay; unknown options name the valid ones.

The generic tests (tests/cases.py: checkpoints, finite in and out, foreach == reference) pick up
the presets by themselves.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt
from kalmanopt.covariance.adaptive import AdaptiveDiagonalSurrogate
from kalmanopt.plan import contract_gap

DT = torch.float64


def _one_param_opt(preset: str, values: torch.Tensor, **hp):
    theta = torch.nn.Parameter(values.clone())
    opt = kalmanopt.create(preset, [theta], r=1.0, **hp)
    return theta, opt


BETA1, BETA2, EPS = 0.8, 0.95, 1e-8


def _one_step_from_an_arbitrary_state(preset: str, seed: int, n: int, q: float, lr: float,
                                      p0: torch.Tensor | None = None) -> SimpleNamespace:
    """One step of ``preset`` from arbitrary m, v (and p, where given) at the layer's fourth update.

    Returns the optimizer's state, θ before and after the step, and the step's m, v, v̄ and λ by the plain
    formulas.
    """
    g = torch.Generator().manual_seed(seed)
    theta, opt = _one_param_opt(preset, torch.randn(n, generator=g, dtype=DT), q=q, lr=lr,
                                beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0)
    theta.grad = torch.randn(n, generator=g, dtype=DT)
    opt.step(loss=1.0)  # creates the state
    state = opt.state[theta]
    m0, v0 = torch.randn(n, generator=g, dtype=DT), torch.rand(n, generator=g, dtype=DT) + 0.1
    state["m"].copy_(m0), state["v"].copy_(v0), state["k"].fill_(3.0)
    state["vsum"].fill_(float(v0.sum()))  # the layer sum of v is state too
    if p0 is not None:
        state["p"].copy_(p0)
    before = theta.detach().clone()
    H = torch.randn(n, generator=g, dtype=DT)
    theta.grad = H.clone()
    opt.step(loss=1.0)
    t = 4
    c1, c2 = (1 - BETA1) / (1 - BETA1**t), (1 - BETA2) / (1 - BETA2**t)
    m, v = m0 + c1 * (H - m0), v0 + c2 * (H * H - v0)
    vbar = v.mean() + EPS**2
    return SimpleNamespace(state=state, before=before, after=theta.detach(), m=m, v=v, vbar=vbar,
                           lam=(v + EPS**2) / vbar)


def test_riccati_step_is_the_exact_kalman_update_with_per_coordinate_information():
    n, q, lr = 7, 0.05, 0.01
    p0 = torch.rand(n, generator=torch.Generator().manual_seed(10), dtype=DT) + 0.05
    r = _one_step_from_an_arbitrary_state("koala-adam-riccati", 0, n, q, lr, p0=p0)
    # the exact filter: P̂ = P + q I; P = (P̂⁻¹ + Λ)⁻¹; θ ← θ − c P m (full matrices, not the recursion)
    P_hat = torch.diag(p0) + q * torch.eye(n, dtype=DT)
    P = torch.linalg.inv(torch.linalg.inv(P_hat) + torch.diag(r.lam))
    assert torch.allclose(P, torch.diag(torch.diagonal(P)), atol=1e-14)  # it stays diagonal
    torch.testing.assert_close(r.state["p"], torch.diagonal(P), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.state["m"], r.m, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.state["v"], r.v, rtol=1e-12, atol=0)
    want = r.before - lr / torch.sqrt(q * r.vbar) * (P @ r.m)
    torch.testing.assert_close(r.after, want, rtol=1e-12, atol=1e-14)


def test_steady_state_step_is_adams_on_a_constant_gradient():
    # L = c·θ: a constant gradient c over four orders of magnitude; Adam steps η per coordinate
    c = torch.tensor([1e-3, -3e-2, 0.5, -2.0, 10.0], dtype=DT)
    q = 1e-6
    theta, opt = _one_param_opt("koala-adam", torch.zeros(5, dtype=DT), q=q, sigma=q**0.5, lr=1e-3, weight_decay=0.0)
    for _ in range(60):
        before = theta.detach().clone()
        theta.grad = c.clone()
        opt.step(loss=1.0)
    step = theta.detach() - before
    p, lam = opt.state[theta]["p"], c * c / (c * c).mean()
    # the steady state of p̂ = p + q, p = p̂ / (1 + p̂ λ): λ p̂² − q λ p̂ − q = 0
    p_hat = (q * lam + torch.sqrt((q * lam) ** 2 + 4 * q * lam)) / (2 * lam)
    torch.testing.assert_close(p, p_hat / (1 + p_hat * lam), rtol=1e-3, atol=0)
    # and the step is Adam's −η sign(c), up to the factor 1 / (1 + √(q λ)) of the posterior
    torch.testing.assert_close(step, -1e-3 * torch.sign(c), rtol=5e-3, atol=0)


def test_steady_covariance_is_the_fixed_point_of_the_recursion_at_each_steps_information():
    n, q, lr = 6, 0.02, 0.01
    r = _one_step_from_an_arbitrary_state("koala-adam-steady", 1, n, q, lr)
    assert "p" not in r.state  # no covariance state
    # p is the fixed point of p ← (p + q) / (1 + (p + q) λ), found here by iterating the recursion itself
    p = torch.full((n,), 0.1, dtype=DT)
    for _ in range(20000):
        p = (p + q) / (1 + (p + q) * r.lam)
    torch.testing.assert_close(r.state["m"], r.m, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.state["v"], r.v, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.state["vsum"], r.v.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.after, r.before - lr / torch.sqrt(q * r.vbar) * p * r.m, rtol=1e-10, atol=1e-14)


def test_steady_covariance_is_the_limit_of_the_newton_iteration():
    c = torch.tensor([1e-3, -3e-2, 0.5, -2.0, 10.0], dtype=DT)
    steps = {}
    for preset in ("koala-adam", "koala-adam-steady"):
        theta, opt = _one_param_opt(preset, torch.zeros(5, dtype=DT), q=1e-4, sigma=1e-2, weight_decay=0.0)
        for _ in range(80):
            before = theta.detach().clone()
            theta.grad = c.clone()
            opt.step(loss=1.0)
        steps[preset] = theta.detach() - before
    torch.testing.assert_close(steps["koala-adam"], steps["koala-adam-steady"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("covariance", ["newton", "riccati", "steady"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gaps=st.lists(st.sampled_from(["grad", "none", "zero"]), min_size=1,
                                                      max_size=12))
def test_the_carried_layer_sum_equals_the_sum_of_the_stored_noise_estimate(covariance, seed, gaps):
    # a missing gradient or a zero one (below the skip threshold) leaves the layer, its v and Σv alone
    g = torch.Generator().manual_seed(seed)
    comp = kalmanopt.compose(measurement="gradient", dynamics="decaying_random_walk", surrogate="adaptive_diagonal",
                             covariance=covariance)
    a = torch.nn.Parameter(torch.randn(9, generator=g, dtype=DT))
    b = torch.nn.Parameter(torch.randn(3, 2, generator=g, dtype=DT))
    opt = kalmanopt.KalmanOptimizer([a, b], comp, r=1.0)
    for gap in gaps:
        scale = float(torch.rand((), generator=g, dtype=DT)) * 10.0 ** float(torch.randint(-3, 3, (), generator=g))
        a.grad = torch.randn(9, generator=g, dtype=DT) * scale
        b.grad = (None if gap == "none" else torch.zeros(3, 2, dtype=DT) if gap == "zero"
                  else torch.randn(3, 2, generator=g, dtype=DT))
        opt.step(loss=1.0)
    for param in (a, b):
        state = opt.state[param]
        if state:
            torch.testing.assert_close(state["vsum"], state["v"].sum(), rtol=1e-12, atol=1e-300)


def test_newton_tracks_the_steady_state_faster_than_the_recursion():
    c = torch.tensor([1e-3, 1.0], dtype=DT)
    errors = {}
    for preset in ("koala-adam", "koala-adam-riccati"):
        theta, opt = _one_param_opt(preset, torch.zeros(2, dtype=DT), q=1e-4, sigma=1e-2, weight_decay=0.0)
        for _ in range(30):
            theta.grad = c.clone()
            opt.step(loss=1.0)
        lam = c * c / (c * c).mean()
        target = torch.sqrt(1e-4 / lam)
        errors[preset] = float((opt.state[theta]["p"] / target - 1).abs().max())
    assert errors["koala-adam"] < 1e-2 < errors["koala-adam-riccati"]


def test_decoupled_weight_decay_is_adamws():
    # with a zero gradient on one coordinate the step there is the decay alone: θ ← (1 − η λ) θ
    theta, opt = _one_param_opt("koala-adam", torch.tensor([2.0, -1.0], dtype=DT), lr=0.01, weight_decay=0.5)
    theta.grad = torch.tensor([1.0, 0.0], dtype=DT)
    opt.step(loss=1.0)
    assert float(theta.detach()[1]) == pytest.approx(-1.0 * (1 - 0.01 * 0.5), rel=1e-15)


def test_innovation_noise_uses_the_prediction_residual():
    theta, opt = _one_param_opt("koala-adam-innovation", torch.zeros(3, dtype=DT), beta2=0.5, weight_decay=0.0)
    g1, g2 = torch.tensor([1.0, 2.0, -1.0], dtype=DT), torch.tensor([3.0, 2.0, 1.0], dtype=DT)
    theta.grad = g1.clone()
    opt.step(loss=1.0)
    torch.testing.assert_close(opt.state[theta]["v"], g1 * g1)  # the first innovation is H − 0
    m1 = opt.state[theta]["m"].clone()
    theta.grad = g2.clone()
    opt.step(loss=1.0)
    c2 = 0.5 / (1 - 0.25)
    torch.testing.assert_close(opt.state[theta]["v"], (1 - c2) * g1 * g1 + c2 * (g2 - m1) ** 2)


def test_zero_process_noise_does_not_move_the_weights():
    theta, opt = _one_param_opt("koala-adam", torch.ones(4, dtype=DT), q=0.0, weight_decay=0.0)
    for _ in range(5):
        theta.grad = torch.tensor([1.0, -1e-3, 0.0, 5.0], dtype=DT)
        opt.step(loss=1.0)
    assert torch.equal(theta.detach(), torch.ones(4, dtype=DT))
    assert all(bool(torch.isfinite(t).all()) for t in opt.state[theta].values())


def test_unknown_options_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid choices: newton, riccati, steady"):
        AdaptiveDiagonalSurrogate(covariance="exact")
    with pytest.raises(ValueError, match="valid choices: second_moment, innovation"):
        AdaptiveDiagonalSurrogate(noise="belief")


def test_compose_builds_the_preset_from_registered_parts():
    comp = kalmanopt.compose(measurement="gradient", dynamics="decaying_random_walk", surrogate="adaptive_diagonal",
                             covariance="riccati", noise="innovation")
    assert comp.surrogate.options() == {"covariance": "riccati", "noise": "innovation"}
    assert contract_gap(comp) is None  # runs on the fast engines
