"""koala-adam-eigen: the per-coordinate gradient filter in the eigenbasis of a Kronecker-factored noise.

Pinned by its derivation (an explicit float64 run on vec(W) with the mn × mn basis U_L ⊗ U_R), by what it
reduces to (a vector parameter is filtered as koala-adam-steady filters it) and by the invariance the basis
buys (an orthogonal change of a layer's row and column coordinates changes nothing but the coordinates).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt

HP = dict(lr=0.05, q=1e-3, beta1=0.9, beta2=0.99, beta3=0.95, eps=1e-8, weight_decay=0.1)


def _problem(m: int, n: int, seed: int, batch: int = 12) -> tuple[torch.Tensor, list]:
    """A weight and minibatches of a least-squares problem ½‖X Wᵀ − Y‖² (full-rank gradients)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64) * 0.3
    batches = [(torch.randn(batch, n, generator=gen, dtype=torch.float64),
                torch.randn(batch, m, generator=gen, dtype=torch.float64)) for _ in range(6)]
    return W, batches


def _loss(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x @ W.T - y).square().sum(1)


def _train(preset: str, W0: torch.Tensor, batches, transform=None, **kw) -> tuple[torch.Tensor, dict]:
    """Steps of ``preset`` on the problem, optionally in coordinates W′ = transform(W)."""
    W = torch.nn.Parameter(W0.clone())
    opt = kalmanopt.create(preset, [W], **{**HP, **kw})
    for x, y in batches:
        opt.zero_grad()
        losses = _loss(W if transform is None else transform(W), x, y)
        losses.mean().backward()
        opt.step(loss=losses.detach())
    return W.detach(), opt.state[W]


def _reference(W0: torch.Tensor, batches, refresh: int) -> torch.Tensor:
    """The documented update on vec(W) (row-major: vec(A X Bᵀ) = (A ⊗ B) vec X), with explicit mn × mn bases."""
    m, n = W0.shape
    W = W0.clone()
    mt = torch.zeros(m * n, dtype=torch.float64)
    vt = torch.zeros(m * n, dtype=torch.float64)
    L = torch.zeros(m, m, dtype=torch.float64)
    R = torch.zeros(n, n, dtype=torch.float64)
    U = torch.eye(m * n, dtype=torch.float64)
    for k, (x, y) in enumerate(batches):
        Wp = W.clone().requires_grad_(True)
        _loss(Wp, x, y).mean().backward()
        H = Wp.grad
        t = k + 1
        L = HP["beta3"] * L + (1 - HP["beta3"]) * H @ H.T
        R = HP["beta3"] * R + (1 - HP["beta3"]) * H.T @ H
        if k % refresh == 0:
            U_new = torch.kron(torch.linalg.eigh(L).eigenvectors, torch.linalg.eigh(R).eigenvectors)
            O = U_new.T @ U
            mt, vt = O @ mt, O.square() @ vt
            U = U_new
        c1 = (1 - HP["beta1"]) / (1 - HP["beta1"] ** t)
        c2 = (1 - HP["beta2"]) / (1 - HP["beta2"] ** t)
        Ht = U.T @ H.reshape(-1)
        mt = mt + c1 * (Ht - mt)
        vt = vt + c2 * (Ht.square() - vt)
        q, eps2 = HP["q"], HP["eps"] ** 2
        vbar = vt.mean() + eps2
        lam = ((vt + eps2) / vbar).clamp_min(1e-8)
        p_hat = 0.5 * q + (0.25 * q * q + q / lam).sqrt()
        p = p_hat / (1 + p_hat * lam)
        D = (U @ (p * mt)).reshape(m, n) / math.sqrt(q * float(vbar))
        W = (1 - HP["lr"] * HP["weight_decay"]) * W - HP["lr"] * D
    return W


@pytest.mark.parametrize("engine", ["reference", "foreach"])
@pytest.mark.parametrize("refresh", [1, 2, 10])
def test_steps_follow_the_derivation(engine, refresh):
    W0, batches = _problem(5, 4, seed=3)
    got, _ = _train("koala-adam-eigen", W0, batches, refresh=refresh, implementation=engine)
    want = _reference(W0, batches, refresh)
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()


def test_a_vector_is_filtered_as_koala_adam_steady():
    gen = torch.Generator().manual_seed(0)
    b0 = torch.randn(7, generator=gen, dtype=torch.float64)
    targets = [torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(5)]
    out = {}
    for preset in ("koala-adam-eigen", "koala-adam-steady"):
        b = torch.nn.Parameter(b0.clone())
        hp = {k: v for k, v in HP.items() if k != "beta3" or preset == "koala-adam-eigen"}
        opt = kalmanopt.create(preset, [b], **hp)
        for target in targets:
            opt.zero_grad()
            loss = 0.5 * (b - target).square().sum()
            loss.backward()
            opt.step(loss=loss.detach())
        out[preset] = b.detach()
    assert torch.allclose(out["koala-adam-eigen"], out["koala-adam-steady"], rtol=0, atol=1e-14)


def _orthogonal(k: int, gen: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 6), n=st.integers(2, 6), refresh=st.sampled_from([1, 3]))
def test_an_orthogonal_change_of_rows_and_columns_changes_only_the_coordinates(seed, m, n, refresh):
    """W′ = A W Bᵀ with orthogonal A, B, trained on the same problem written in W′: W′_k = A W_k Bᵀ (the basis
    follows the coordinates; Adam's per-coordinate scale does not, which the last line checks).

    Where the eigenvalues are distinct: one gradient of a non-square layer leaves the longer side's factor
    singular, and a basis of its null space is arbitrary, so such a layer refreshes at every step here (the
    next gradient fills the null space in)."""
    refresh = refresh if m == n else 1
    gen = torch.Generator().manual_seed(seed)
    W0, batches = _problem(m, n, seed, batch=2 * (m + n))
    A, B = _orthogonal(m, gen), _orthogonal(n, gen)

    def original(Wr: torch.Tensor) -> torch.Tensor:
        return A.T @ Wr @ B

    plain, _ = _train("koala-adam-eigen", W0, batches, refresh=refresh)
    rotated, _ = _train("koala-adam-eigen", A @ W0 @ B.T, batches, transform=original, refresh=refresh)
    assert torch.allclose(rotated, A @ plain @ B.T, rtol=0, atol=1e-8), (rotated - A @ plain @ B.T).abs().max()
    hp = {k: v for k, v in HP.items() if k != "beta3"}
    plain_adam = _train_steady(W0, batches, None, hp)
    rotated_adam = _train_steady(A @ W0 @ B.T, batches, original, hp)
    assert (rotated_adam - A @ plain_adam @ B.T).abs().max() > 1e-6


def _train_steady(W0, batches, transform, hp) -> torch.Tensor:
    W = torch.nn.Parameter(W0.clone())
    opt = kalmanopt.create("koala-adam-steady", [W], **hp)
    for x, y in batches:
        opt.zero_grad()
        losses = _loss(W if transform is None else transform(W), x, y)
        losses.mean().backward()
        opt.step(loss=losses.detach())
    return W.detach()


def test_a_long_side_keeps_the_identity_and_the_state_is_carried_across_refreshes():
    W0, batches = _problem(6, 3, seed=1)
    _, state = _train("koala-adam-eigen", W0, batches, refresh=2, max_dim=4)
    assert state["basis_rows"].shape == (6,) and torch.equal(state["basis_rows"], torch.ones(6, dtype=torch.float64))
    U = state["basis_cols"]
    assert U.shape == (3, 3) and torch.allclose(U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert bool((state["v"] >= 0).all())


def test_a_bad_option_names_the_choices():
    W = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="refresh"):
        kalmanopt.create("koala-adam-eigen", [W], refresh=0)
