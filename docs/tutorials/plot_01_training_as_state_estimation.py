"""
1. Training as state estimation
===============================

A Kalman filter estimates a hidden state from noisy measurements. Training a model can be read
the same way: the **weights are the hidden state**, and each minibatch tells us something noisy
about them. This tutorial starts where that reading is exact — a linear regression, whose
Bayesian answer *is* a Kalman filter — and then moves to a small network and the extended Kalman
filter (EKF) that kalmanopt's optimizers approximate.

Everything runs on a CPU in a few seconds.
"""

# %%
# Linear regression: the Kalman filter is the answer
# ---------------------------------------------------
#
# Take data :math:`y_i = x_i^\top w^\star + \varepsilon_i` with Gaussian noise of variance
# :math:`r`, and a Gaussian prior :math:`w \sim \mathcal N(0, \sigma I)`. The posterior of
# :math:`w` after all the data has the closed form
#
# .. math::
#
#    P_N = \Bigl(\tfrac1\sigma I + \tfrac1r X^\top X\Bigr)^{-1}, \qquad
#    \hat w_N = \tfrac1r P_N X^\top y .
#
# A Kalman filter with the weights as the state, no dynamics (:math:`F = I`, :math:`Q = 0`) and
# one *linear* measurement :math:`y_i = x_i^\top w + \varepsilon_i` per sample computes the same
# posterior one sample at a time:
#
# .. math::
#
#    S_i = x_i^\top P_{i-1} x_i + r, \quad K_i = P_{i-1} x_i / S_i, \quad
#    \hat w_i = \hat w_{i-1} + K_i\,(y_i - x_i^\top \hat w_{i-1}), \quad
#    P_i = P_{i-1} - K_i x_i^\top P_{i-1}.
#
# Let us check that, in float64.

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import kalmanopt
from kalmanopt.analysis import ExactEKF, exact_ekf_update

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

n, N, r, sigma = 5, 200, 0.25, 1.0
w_star = torch.randn(n)
X = torch.randn(N, n)
y = X @ w_star + r**0.5 * torch.randn(N)

# the closed-form posterior
P_closed = torch.linalg.inv(torch.eye(n) / sigma + X.T @ X / r)
w_closed = P_closed @ X.T @ y / r

# the Kalman filter, one sample at a time
w_kf, P_kf = torch.zeros(n), sigma * torch.eye(n)
kf_error = []
for x_i, y_i in zip(X, y):
    S = x_i @ P_kf @ x_i + r
    K = P_kf @ x_i / S
    w_kf = w_kf + K * (y_i - x_i @ w_kf)
    P_kf = P_kf - torch.outer(K, x_i @ P_kf)
    kf_error.append(float(torch.linalg.vector_norm(w_kf - w_star)))

print(f"|w_KF - w_closed| = {torch.linalg.vector_norm(w_kf - w_closed):.2e}")
print(f"|P_KF - P_closed| = {torch.linalg.matrix_norm(P_kf - P_closed):.2e}")

# %%
# The two agree to rounding: for a linear model with Gaussian noise, *the* Bayesian estimate of
# the weights is a Kalman filter over them. Gradient descent on the squared error reaches the same
# least-squares solution, but only asymptotically and with a step size to tune; the filter's
# covariance :math:`P` is a per-direction step size that it computes itself.

# %%
# The loss as the measurement
# ---------------------------
#
# A network's output is not linear in its weights, and the targets of a classification problem
# are not Gaussian. kalmanopt uses a measurement that works for any model: the **minibatch loss**
# :math:`L_k(\theta)`, whose target value is :math:`L^\star = 0`. Linearising it at the current
# weights gives the measurement Jacobian :math:`H_k = \nabla L_k`, and the EKF step
# (:ref:`derivation §1 <derivation-ekf>`, :eq:`eq-ekf`) is
#
# .. math::
#
#    \hat P_k = P_{k-1} + Q I,\quad S_k = H_k \hat P_k H_k^\top + R_k,\quad
#    \theta_k = \theta_{k-1} - \eta\, L_k\, \hat P_k H_k^\top / S_k,\quad
#    P_k = \hat P_k - \hat P_k H_k^\top H_k \hat P_k / S_k .
#
# :class:`~kalmanopt.analysis.exact_ekf.ExactEKF` runs exactly this, with the full
# :math:`n \times n` covariance, as a ``torch.optim`` optimizer. Train the same linear model with
# it, with minibatches of 10, against SGD with a tuned step size:


def train(make_opt, steps_per_epoch=20, epochs=10, batch=10):
    """Train a linear model; return the distance to w* after every step."""
    torch.manual_seed(1)
    model = torch.nn.Linear(n, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = make_opt(model)
    error = []
    for _ in range(epochs):
        order = torch.randperm(N)
        for k in range(steps_per_epoch):
            idx = order[k * batch:(k + 1) * batch]
            losses = 0.5 * (model(X[idx]).squeeze(1) - y[idx]) ** 2  # per-sample losses
            opt.zero_grad()
            losses.mean().backward()
            if isinstance(opt, torch.optim.SGD):
                opt.step()
            else:
                opt.step(loss=losses)  # the filter reads the per-sample losses (for R_k)
            error.append(float(torch.linalg.vector_norm(model.weight.detach().squeeze(0) - w_star)))
    return error


ekf_error = train(lambda m: ExactEKF(m.parameters(), sigma=1.0, q=0.0, r=None))
sgd_error = train(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))

fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogy(range(1, N + 1), kf_error, label="Kalman filter, linear measurement (1 sample/step)")
ax.semilogy(range(1, len(ekf_error) + 1), ekf_error, label="exact EKF, loss measurement (10 samples/step)")
ax.semilogy(range(1, len(sgd_error) + 1), sgd_error, label="SGD, lr = 0.1 (10 samples/step)")
ax.axhline(float(torch.linalg.vector_norm(w_closed - w_star)), color="0.5", ls=":", label="closed-form posterior mean")
ax.set_xlabel("step")
ax.set_ylabel(r"$\|w - w^\star\|$")
ax.set_title("Linear regression: distance to the true weights")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# The loss-measurement EKF is not the linear Kalman filter — it measures one scalar per batch,
# the loss, rather than every target — but it keeps what makes the filter fast: a covariance that
# shrinks along the directions it has measured and a step size that follows from it.
#
# The exact EKF's covariance
# --------------------------
#
# What does :math:`P` look like? Feed :func:`~kalmanopt.analysis.exact_ekf.exact_ekf_update`
# the gradients of a few steps by hand and watch its eigenvalues: every measurement removes
# variance along one direction, :math:`H_k`, and leaves the orthogonal complement at its prior.

P = torch.eye(n)
spectra = [torch.linalg.eigvalsh(P).flip(0)]
model = torch.nn.Linear(n, 1, bias=False)
for k in range(4):
    idx = torch.arange(10 * k, 10 * k + 10)
    loss = 0.5 * ((model(X[idx]).squeeze(1) - y[idx]) ** 2).mean()
    H = torch.autograd.grad(loss, model.weight)[0].reshape(-1)
    P = exact_ekf_update(P, H, R=r, q=0.0).P
    spectra.append(torch.linalg.eigvalsh(P).flip(0))

fig, ax = plt.subplots(figsize=(6, 3.5))
for k, eig in enumerate(spectra):
    ax.semilogy(range(1, n + 1), eig, marker="o", label=f"after {k} measurement(s)")
ax.set_xlabel("eigenvalue index (descending)")
ax.set_ylabel("eigenvalue of P")
ax.set_title("Each scalar measurement shrinks P along one direction")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# A small network with the exact EKF
# ----------------------------------
#
# Now a network: a 1–16–1 tanh MLP fitting :math:`\sin(3x)` (49 parameters, so the exact
# :math:`P` is small). The measurement is the same — the minibatch loss — and :math:`H_k` is the
# gradient that ``backward()`` computes. kalmanopt's presets replace the exact :math:`P` by
# something a large network can afford; ``koala++`` is shown beside the exact filter and Adam,
# each with a setting that suits it: ``koala++`` with its defaults (``sigma=0.1, q=0.1``), the
# exact filter with little process noise (``q=1e-3``). With the exact filter's ``q``, ``koala++``
# barely moves on this problem (change the line below and see): its estimate of :math:`P` has
# rank two at most (:ref:`derivation §6 <derivation-least-squares>`), so outside the plane of the
# last gradient and product its predicted covariance is :math:`Q I` alone, and :math:`Q` sets the
# step size in every new direction.

torch.manual_seed(0)
x_train = torch.linspace(-2, 2, 256).unsqueeze(1)
y_train = torch.sin(3 * x_train) + 0.05 * torch.randn_like(x_train)


def fit(make_opt, steps=300, batch=32, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = make_opt(net)
    curve = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch,))
        losses = F.mse_loss(net(x_train[idx]), y_train[idx], reduction="none").squeeze(1)
        opt.zero_grad()
        losses.mean().backward()
        if isinstance(opt, torch.optim.Adam):
            opt.step()
        else:
            opt.step(loss=losses)
        with torch.no_grad():
            curve.append(float(F.mse_loss(net(x_train), y_train)))
    return net, curve


# one P per parameter tensor (granularity="layer"), as the presets do; R follows the losses
net_ekf, curve_ekf = fit(lambda m: ExactEKF(m.parameters(), sigma=1.0, q=1e-3, lr=1.0))
net_pp, curve_pp = fit(lambda m: kalmanopt.create("koala++", m.parameters(), sigma=0.1, q=0.1, lr=1.0))
net_adam, curve_adam = fit(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
ax1.semilogy(curve_ekf, label="exact EKF (full P per layer)")
ax1.semilogy(curve_pp, label="koala++ (v_k = H_k P_{k-1} only)")
ax1.semilogy(curve_adam, label="Adam, lr = 1e-2")
ax1.set_xlabel("step")
ax1.set_ylabel("training MSE (full data)")
ax1.legend(fontsize=8)
with torch.no_grad():
    ax2.plot(x_train, y_train, ".", color="0.7", ms=3, label="data")
    ax2.plot(x_train, net_ekf(x_train), label="exact EKF")
    ax2.plot(x_train, net_pp(x_train), "--", label="koala++")
ax2.set_title("the fitted functions")
ax2.legend(fontsize=8)
fig.tight_layout()

print(f"final MSE: exact EKF {curve_ekf[-1]:.4f}, koala++ {curve_pp[-1]:.4f}, Adam {curve_adam[-1]:.4f}")

# %%
# The exact EKF stores and updates a :math:`16 \times 16`, a :math:`16 \times 16`, a
# :math:`16 \times 16` and a :math:`1 \times 1` covariance here; for a network of a million
# weights per layer that is impossible. The next tutorial opens up what each preset keeps of
# :math:`P` — a scalar, a 2×2 block, a diagonal, the product :math:`v_k = H_k P_{k-1}` — and
# measures what each gives up against this exact filter.

# (this script set float64 as torch's default dtype; later scripts in the same process expect float32)
torch.set_default_dtype(torch.float32)
