"""The analysis tools: per-sample gradients, Hessians, the exact EKF, the side-by-side comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt
from kalmanopt.analysis import (
    SUPPORTED_PRESETS,
    EKFComparison,
    ExactEKF,
    compare_with_exact_ekf,
    exact_ekf_update,
    flatten,
    gradient_covariance,
    hessian,
    hessian_vector_product,
    per_sample_gradients,
    plot_spectra,
    surrogate_covariance,
    unflatten,
)
from kalmanopt.analysis.compare import _eigenvalues

# torch's forward-mode AD loads its decompositions through torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _mlp(seed: int = 0, sizes=(4, 5, 3)) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Tanh(),
                               torch.nn.Linear(sizes[1], sizes[2])).double()


def _data(seed: int = 0, n: int = 6, d: int = 4, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def _per_sample_ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _mean_ce(outputs, targets):
    return F.cross_entropy(outputs, targets)


# ---------------------------------------------------------------------- per-sample gradients
@pytest.mark.parametrize("loss_fn", [_per_sample_ce, _mean_ce])
def test_per_sample_gradients_equal_a_loop_over_samples(loss_fn):
    model, (X, y) = _mlp(), _data()
    grads = per_sample_gradients(model, None, X, y, loss_fn)
    for i in range(X.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-12, atol=1e-14)
    flat = per_sample_gradients(model, None, X, y, loss_fn, flat=True)
    assert flat.shape == (X.shape[0], sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(flat, flatten(grads, batch_dims=1))
    # their mean is the gradient of the mean loss
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    batch_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat.mean(0), batch_grad, rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_at_given_params_differ_from_the_models_own():
    model, (X, y) = _mlp(), _data()
    shifted = {name: p.detach() + 0.1 for name, p in model.named_parameters()}
    at_shift = per_sample_gradients(model, shifted, X, y, _per_sample_ce, flat=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(at_shift, per_sample_gradients(model, None, X, y, _per_sample_ce, flat=True))
    with pytest.raises(ValueError, match="not parameters of the model"):
        per_sample_gradients(model, {"nope": torch.zeros(1)}, X, y, _per_sample_ce)


@pytest.mark.parametrize("centered,correction", [(True, 0), (True, 1), (False, 0)])
def test_gradient_covariance_equals_the_textbook_estimate(centered, correction):
    model, (X, y) = _mlp(), _data(n=9)
    G = per_sample_gradients(model, None, X, y, _per_sample_ce, flat=True).numpy()
    C = gradient_covariance(per_sample_gradients(model, None, X, y, _per_sample_ce),
                            centered=centered, correction=correction).numpy()
    if centered:
        expected = np.cov(G, rowvar=False, ddof=correction)
    else:
        expected = sum(np.outer(g, g) for g in G) / (G.shape[0] - correction)
    np.testing.assert_allclose(C, expected, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="degrees of freedom"):
        gradient_covariance(torch.zeros(1, 3), correction=1)


# ---------------------------------------------------------------------- Hessians
def _flat_loss(model, X, y):
    params = dict(model.named_parameters())

    def loss(theta):
        return _mean_ce(torch.func.functional_call(model, unflatten(theta, params), (X,)), y)

    return loss, flatten({k: v.detach() for k, v in params.items()})


def test_hessian_and_hvp_equal_autograd_hessian():
    model, (X, y) = _mlp(), _data()
    loss, theta = _flat_loss(model, X, y)
    expected = torch.autograd.functional.hessian(loss, theta)
    full = hessian(model, None, X, y, _per_sample_ce)
    torch.testing.assert_close(full, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full, full.T, rtol=1e-10, atol=1e-12)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hv = hessian_vector_product(model, None, X, y, _per_sample_ce, v)
    torch.testing.assert_close(hv, expected @ v, rtol=1e-10, atol=1e-12)
    # the dict form gives the same numbers, shaped like the parameters
    params = {k: p.detach() for k, p in model.named_parameters()}
    hv_dict = hessian_vector_product(model, None, X, y, _per_sample_ce, unflatten(v, params))
    torch.testing.assert_close(flatten(hv_dict), hv)


def test_hvp_equals_central_finite_differences_of_the_gradient():
    model, (X, y) = _mlp(seed=1), _data(seed=1)
    loss, theta = _flat_loss(model, X, y)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-5
    grad = torch.func.grad(loss)
    fd = (grad(theta + eps * v) - grad(theta - eps * v)) / (2 * eps)
    hv = hessian_vector_product(model, None, X, y, _per_sample_ce, v)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def test_hessian_refuses_a_model_too_large():
    model, (X, y) = _mlp(), _data()
    with pytest.raises(ValueError, match="max_parameters"):
        hessian(model, None, X, y, _per_sample_ce, max_parameters=10)


# ---------------------------------------------------------------------- the exact EKF
def _hand_ekf(X, y, w0, blocks, steps, *, sigma, q, lr, r, alpha_r, wd):
    """The EKF of docs/derivation.md §1 for f(x) = w·x, ℓ_i = ½ (w·x_i − y_i)², written out in numpy.

    blocks: index lists of w, one filter each (the layers, or everything for a global filter).
    """
    w = w0.copy()
    P = [sigma * np.eye(len(b)) for b in blocks]
    R = 1.0
    for _ in range(steps):
        e = X @ w - y                       # residuals
        losses = 0.5 * e**2                 # ℓ_i
        L = losses.mean()
        g = X.T @ e / len(y)                # ∇ mean ℓ
        R = r if r is not None else alpha_r * R + (1 - alpha_r) * np.mean(losses**2)
        w_new = w.copy()
        for j, b in enumerate(blocks):
            H = g[b] + wd * w[b]
            L_b = L + 0.5 * wd * w[b] @ w[b]
            P_hat = P[j] + q * np.eye(len(b))
            S = H @ P_hat @ H + R
            K = P_hat @ H / S
            w_new[b] = w[b] - lr * L_b * K
            P[j] = (np.eye(len(b)) - np.outer(K, H)) @ P_hat
        w = w_new
    return w, P


@pytest.mark.parametrize("granularity,r", [("global", 0.5), ("layer", None)])
def test_exact_ekf_on_linear_least_squares_equals_the_recursion_by_hand(granularity, r):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64))
        model.bias.fill_(0.1)
    hp = dict(sigma=0.2, q=0.05, lr=0.7, r=r, alpha_r=0.8, weight_decay=0.01)
    opt = ExactEKF(model.parameters(), granularity=granularity, **hp)
    steps = 6
    for _ in range(steps):
        losses = 0.5 * (model(X).squeeze(1) - y) ** 2
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    # the bias as a fourth weight on a constant input
    X1 = np.hstack([X.numpy(), np.ones((8, 1))])
    blocks = [[0, 1, 2, 3]] if granularity == "global" else [[0, 1, 2], [3]]
    w, P = _hand_ekf(X1, y.numpy(), np.array([0.3, -0.2, 0.5, 0.1]), blocks, steps,
                     sigma=hp["sigma"], q=hp["q"], lr=hp["lr"], r=r, alpha_r=hp["alpha_r"], wd=hp["weight_decay"])
    got = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-13)
    for got_P, hand_P in zip(opt.covariances().values(), P):
        np.testing.assert_allclose(got_P.numpy(), hand_P, rtol=1e-10, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), steps=st.integers(1, 12), seed=st.integers(0, 2**16),
       log_r=st.floats(-6.0, 1.0), log_scale=st.floats(-2.0, 3.0))
def test_exact_ekf_with_q_zero_and_rank_one_measurements_stays_symmetric_psd(n, steps, seed, log_r, log_scale):
    gen = torch.Generator().manual_seed(seed)
    sigma, R = 0.3, 10.0**log_r
    h = torch.randn(n, generator=gen, dtype=torch.float64)
    P = sigma * torch.eye(n, dtype=torch.float64)
    information_along_h = 1.0 / sigma
    for _ in range(steps):
        # rank one: every measurement along the same direction h, with a random scale
        H = (10.0**log_scale) * torch.randn((), generator=gen, dtype=torch.float64) * h
        P = exact_ekf_update(P, H, R, q=0.0).P
        information_along_h += float(H @ H) / R
        assert torch.equal(P, P.T)
        eig = torch.linalg.eigvalsh(P)
        assert float(eig[0]) >= -1e-12 * float(eig[-1])
    # closed form: P_k = sigma (I − ĥĥᵀ) + ĥĥᵀ / (1/sigma + Σ_j ‖H_j‖² / R)
    h_unit = h / torch.linalg.vector_norm(h)
    projector = torch.outer(h_unit, h_unit)
    expected = sigma * (torch.eye(n, dtype=torch.float64) - projector) + projector / information_along_h
    torch.testing.assert_close(P, expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 6), steps=st.integers(1, 10), seed=st.integers(0, 2**16), log_r=st.floats(-1.0, 1.0))
def test_exact_ekf_with_q_zero_equals_the_information_form(n, steps, seed, log_r):
    gen = torch.Generator().manual_seed(seed)
    sigma, R = 0.3, 10.0**log_r
    P = sigma * torch.eye(n, dtype=torch.float64)
    information = torch.eye(n, dtype=torch.float64) / sigma
    for _ in range(steps):
        H = torch.randn(n, generator=gen, dtype=torch.float64)
        P = exact_ekf_update(P, H, R, q=0.0).P
        # with q = 0:  P_k⁻¹ = P_0⁻¹ + Σ_j H_jᵀ H_j / R
        information = information + torch.outer(H, H) / R
    torch.testing.assert_close(P, torch.linalg.inv(information), rtol=1e-8, atol=1e-12)


def test_exact_ekf_update_gives_the_textbook_gain_and_innovation():
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    P = B @ B.T + 0.1 * torch.eye(5, dtype=torch.float64)
    H = torch.randn(5, generator=gen, dtype=torch.float64)
    out = exact_ekf_update(P, H, 0.3, q=0.2)
    P_hat = P + 0.2 * torch.eye(5, dtype=torch.float64)
    S = H @ P_hat @ H + 0.3
    K = P_hat @ H / S
    torch.testing.assert_close(out.S, S)
    torch.testing.assert_close(out.direction / out.S, K)
    torch.testing.assert_close(out.P, (torch.eye(5, dtype=torch.float64) - torch.outer(K, H)) @ P_hat)
    with pytest.raises(ValueError, match="must be 4 × 4"):
        exact_ekf_update(torch.eye(3), torch.ones(4), 1.0, 0.0)


def test_exact_ekf_rejects_bad_settings():
    model = _mlp()
    with pytest.raises(ValueError, match="valid choices: layer, global"):
        ExactEKF(model.parameters(), granularity="tensor")
    with pytest.raises(ValueError, match="max_parameters"):
        ExactEKF(model.parameters(), granularity="global", max_parameters=20)
    with pytest.raises(ValueError, match="'q'"):
        ExactEKF(model.parameters(), q=-1.0)


# ---------------------------------------------------------------------- side by side
def _batches(steps: int, seed: int = 0, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]


def test_compare_koala_pp_runs_and_records_finite_spectra():
    model, batches = _mlp(), _batches(12)
    result = compare_with_exact_ekf(model, "koala++", batches, _per_sample_ce, record_every=4, sigma=0.1, q=0.01)
    assert result.steps == list(range(1, 13))
    assert result.spectrum_steps == [1, 5, 9]
    assert result.layers == [name for name, _ in model.named_parameters()]
    for name, n in zip(result.layers, result.layer_sizes):
        assert len(result.cosine[name]) == 12
        assert all(np.isfinite(c) and -1 - 1e-12 <= c <= 1 + 1e-12 for c in result.cosine[name])
        for exact, surrogate in zip(result.exact_eigenvalues[name], result.surrogate_eigenvalues[name]):
            assert len(exact) == len(surrogate) == n
            assert np.all(np.isfinite(exact)) and np.all(np.isfinite(surrogate))
            assert exact == sorted(exact, reverse=True)
        # step 1 records P_0 = sigma I, and v_1 is along H_1 as is H_1 P_0
        np.testing.assert_allclose(result.exact_eigenvalues[name][0], 0.1, rtol=1e-12)
        assert result.cosine[name][0] == pytest.approx(1.0, abs=1e-9)
        # the exact P only shrinks from sigma + k q (measurements remove variance)
        assert max(result.exact_eigenvalues[name][-1]) <= 0.1 + 8 * 0.01 + 1e-12
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_compare_trains_the_model_exactly_as_the_preset_alone():
    batches = _batches(6, seed=2)
    model = _mlp(seed=3)
    compare_with_exact_ekf(model, "koala++", batches, _per_sample_ce, record_every=2, weight_decay=1e-3)
    alone = _mlp(seed=3)
    opt = kalmanopt.create("koala++", alone.parameters(), weight_decay=1e-3, implementation="reference")
    for X, y in batches:
        losses = _per_sample_ce(alone(X), y)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    for p, p_alone in zip(model.parameters(), alone.parameters()):
        torch.testing.assert_close(p, p_alone, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("preset", ["koala-v", "koala-diag"])
def test_compare_reads_the_scalar_and_diagonal_surrogates(preset):
    result = compare_with_exact_ekf(_mlp(), preset, _batches(5), _per_sample_ce, record_every=2,
                                    sigma=0.2, q=0.05, granularity="global")
    assert result.layers == ["global"]
    # P_0 = sigma I on both sides; then the shared scalar is all equal, the diagonal not
    np.testing.assert_allclose(result.surrogate_eigenvalues["global"][0], 0.2, rtol=1e-6)
    assert result.relative_error["global"][0] == pytest.approx(0.0, abs=1e-6)
    last = np.array(result.surrogate_eigenvalues["global"][-1])
    if preset == "koala-v":
        np.testing.assert_allclose(last, last[0], rtol=1e-12)
        # for p I, v_k = p H_k: the cosine measures how far H_k P_{k-1} turns away from H_k
        assert all(c <= 1 + 1e-12 for c in result.cosine["global"])
    else:
        assert last.max() > last.min()
    assert np.all(last > 0) and np.all(last <= 0.2 + 5 * 0.05)


def test_compare_low_rank_over_the_whole_model():
    model = _mlp()
    result = compare_with_exact_ekf(model, "koala++-lr", _batches(6), _per_sample_ce, record_every=5,
                                    granularity="global", memory=3)
    n = sum(p.numel() for p in model.parameters())
    assert result.layers == ["global"] and result.layer_sizes == [n]
    assert result.spectrum_steps == [1, 6]
    for surrogate in result.surrogate_eigenvalues["global"]:
        assert len(surrogate) == n and np.all(np.isfinite(surrogate))
    assert result.cosine["global"][0] == pytest.approx(1.0, abs=1e-9)
    assert all(np.isfinite(c) for c in result.cosine["global"])


@pytest.mark.parametrize("preset", ["koala++", "koala++-ns", "koala++-lr"])
def test_surrogate_covariance_satisfies_the_estimators_constraints(preset):
    model, batches = _mlp(), _batches(4)
    opt = kalmanopt.create(preset, model.parameters(), implementation="reference")
    for X, y in batches:
        losses = _per_sample_ce(model(X), y)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    for p in model.parameters():
        state = opt.state[p]
        P_tilde = surrogate_covariance(opt, state)
        # H_k P̃ = v_k (and, for the low-rank surrogate, every kept row's product)
        torch.testing.assert_close(state["H"] @ P_tilde, state["v"], rtol=1e-8, atol=1e-12)
        if preset == "koala++-lr":
            rows, products = opt.filter.surrogate.older_rows(state)
            torch.testing.assert_close(rows @ P_tilde, products, rtol=1e-6, atol=1e-12)
        if preset != "koala++-ns":
            torch.testing.assert_close(P_tilde, P_tilde.T)
        # the spectrum computed on span(H, v, older rows) is the full one of P̃'s symmetric part
        span = [state["H"][None], state["v"][None]]
        if preset == "koala++-lr":
            span += [rows, products]
        projected = _eigenvalues(P_tilde.double(), torch.cat(span).double())
        full = torch.linalg.eigvalsh(0.5 * (P_tilde + P_tilde.T).double()).flip(0)
        np.testing.assert_allclose(projected, full.numpy(), rtol=0, atol=1e-9 * float(full.abs().max()))
    with pytest.raises(ValueError, match="product surrogate"):
        surrogate_covariance(kalmanopt.create("koala-v", model.parameters()), {})


def test_compare_rejects_what_it_cannot_compare():
    with pytest.raises(ValueError, match="supported presets: " + ", ".join(SUPPORTED_PRESETS).replace("+", r"\+")):
        compare_with_exact_ekf(_mlp(), "koala-m", _batches(1), _per_sample_ce)
    with pytest.raises(ValueError, match="max_parameters"):
        compare_with_exact_ekf(_mlp(), "koala++", _batches(1), _per_sample_ce, max_parameters=10)
    with pytest.raises(ValueError, match="record_every"):
        compare_with_exact_ekf(_mlp(), "koala++", _batches(1), _per_sample_ce, record_every=0)


def test_plot_spectra_writes_a_png(tmp_path):
    result = compare_with_exact_ekf(_mlp(), "koala++", _batches(6), _per_sample_ce, record_every=2)
    path = plot_spectra(result, tmp_path / "figs" / "spectra.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # from a JSON log, for one layer
    logged = json.loads(json.dumps(result.to_dict()))
    path2 = plot_spectra(logged, tmp_path / "one.png", layers=["0.weight"])
    assert path2.stat().st_size > 2000
    assert isinstance(EKFComparison.from_dict(logged), EKFComparison)
    with pytest.raises(ValueError, match="unknown layer"):
        plot_spectra(result, tmp_path / "x.png", layers=["nope"])
