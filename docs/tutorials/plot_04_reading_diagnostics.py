r"""
4. Reading the diagnostics of a run
===================================

A Kalman optimizer computes, at every step, quantities with a meaning: the innovation variance
:math:`S_k`, the size of the gain, for KOALA++ the coefficients :math:`\lambda_k, \alpha_k, w_k`
of its recursion (:ref:`derivation §5 <derivation-koala-pp>`), and it counts the events its
safeguards handled. This tutorial reads them — from the optimizer directly, then from the plots
that ``kalmanopt run`` draws — and says what healthy and unhealthy values look like.
"""

# %%
# Recording the internals
# -----------------------
#
# ``track_diagnostics=True`` makes the optimizer keep the last step's per-layer internals;
# ``opt.diagnostics()`` returns them with the event counters. (Recording runs the reference path
# and reads values back to the host, so leave it off where speed matters; the counters are kept
# either way.)

import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import kalmanopt
from kalmanopt.runner import parse_config, run_experiment

digits = load_digits()  # 1797 images of 8×8 pixels, shipped with scikit-learn
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
opt = kalmanopt.create("koala++", model.parameters(), sigma=0.1, q=0.5, lr=2.0, track_diagnostics=True)

history = []  # one dict per step: layer name -> {quantity: value}
for _ in range(150):
    idx = torch.randint(0, len(y), (32,))
    losses = F.cross_entropy(model(X[idx]), y[idx], reduction="none")
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses)
    history.append(opt.diagnostics()["layers"])

last = opt.diagnostics()
print("counters:", last["counters"])
for layer, values in last["layers"].items():
    print(layer, {k: round(v, 4) for k, v in values.items()})

# %%
# Per layer (``group0/param0`` is the first weight matrix, ``param1`` its bias, ...) the last
# step gives:
#
# ``S``
#    the innovation variance :math:`S_k = H_k \hat P_k H_k^\top + R_k` (:eq:`eq-product-step`):
#    how uncertain the filter is about this layer's loss, noise included. It is at least
#    :math:`R_k`; a layer whose ``S`` falls towards zero or below is what the guard catches.
# ``gain_scale``
#    :math:`\eta L_\ell / S_k`, the factor multiplying the step direction :math:`v_k + Q H_k`:
#    the effective learning rate of the layer.
# ``lambda``, ``alpha``, ``w``
#    the coefficients of the recursion :eq:`eq-product-recursion`:
#    :math:`v_k = (\alpha_k - \lambda_k) v_{k-1} + Q (H_k - \lambda_k H_{k-1}) + w_k H_{k-1}`.
#    :math:`\alpha_k = H_k\cdot H_{k-1} / \lVert H_{k-1}\rVert^2` measures how much consecutive
#    gradients agree; :math:`\lambda_k` how much of the last step's direction the posterior removes.
# ``cos_Hv``
#    the cosine between :math:`H_k` and :math:`v_k`: 1 when the filter steps along the gradient,
#    smaller when :math:`v_k` has turned away from it.
#
# Over the steps:

layers = list(history[-1])
quantities = [("S", "log"), ("gain_scale", "log"), ("lambda", "linear"), ("alpha", "linear"),
              ("w", "symlog"), ("cos_Hv", "linear")]
fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
for ax, (key, scale) in zip(axes.flat, quantities):
    for layer in layers:
        ax.plot([h[layer][key] if layer in h else float("nan") for h in history], lw=1, label=layer)
    ax.set_yscale(scale)
    ax.set_title(key)
for ax in axes[1]:
    ax.set_xlabel("step")
axes[0, 0].legend(fontsize=7)
fig.suptitle("koala++ on digits: per-layer internals at every step")
fig.tight_layout()

# %%
# What to look for:
#
# * ``S`` is never below :math:`R_k`, and :math:`R_k` follows the second moment of the
#   per-sample losses. As the loss falls, :math:`R_k` and :math:`S_k` fall with it, so the gain
#   scale :math:`\eta L_\ell/S_k` does not shrink with the loss the way :math:`L_\ell` alone
#   would: the filter sets its own step size.
# * ``alpha`` is the projection of the new gradient on the last one: positive when consecutive
#   minibatch gradients agree, near 0 when they are nearly orthogonal (noise dominates), negative
#   when they point against each other — the signature of steps that overshoot and oscillate.
#   ``lambda``, :math:`H_k\cdot u_{k-1}/S_{k-1}`, is the part of the last step's direction that
#   the new gradient contains, in units of the last innovation variance; its sign follows the
#   same agreement or disagreement.
# * A ``cos_Hv`` that drifts towards 0 or below means :math:`v_k` no longer points along the
#   gradient and the step is mostly made of earlier directions. One cause is a ``q`` too small
#   for the problem: outside the plane of the last gradient and product, KOALA++'s covariance is
#   :math:`Q I` (:ref:`derivation §6 <derivation-least-squares>`).
#
# The counters
# ------------
#
# ``steps``, ``nonfinite_steps``, ``skipped_layers``, ``guard_restarts`` and ``rows_dropped``
# live in the optimizer's state, so they survive checkpoints (the
# :doc:`reliability page <../reliability>` says what each safeguard does). A step whose loss or
# gradient is not finite changes nothing and is counted:

losses = F.cross_entropy(model(X[:32]), y[:32], reduction="none")
opt.zero_grad()
losses.mean().backward()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt.step(loss=losses * float("nan"))  # a NaN loss, as a broken batch would give
print("warning:", caught[0].message if caught else None)
print("counters:", opt.diagnostics()["counters"])

# %%
# ``guard_restarts`` counts layers whose :math:`S_k` was not positive (or not finite) and that
# were restarted from their first-update state (:ref:`derivation §8 <derivation-guard>`); a few
# are normal for the product surrogates, a steady climb says ``sigma`` or ``q`` is too small for
# the problem. ``skipped_layers`` counts layers with no gradient (or an overflowing one);
# ``rows_dropped`` the constraints the low-rank surrogate dropped as ill-conditioned.
#
# The runner's diagnostics plots
# ------------------------------
#
# ``kalmanopt run`` builds every Kalman optimizer with ``track_diagnostics=True``, logs
# ``opt.diagnostics()`` every ``log_every`` steps into ``metrics.jsonl`` and draws two kinds of
# figure (:doc:`the runner page <../runner>`): ``diagnostics.png`` (median over layers, band
# over seeds, one line per optimizer) and ``diagnostics-<optimizer>.png`` (the first seed, one
# line per layer). A short run of ``koala++`` and ``koala++-lr``:

config = parse_config({
    "name": "diagnostics", "task": "digits", "model": "mlp", "seeds": [0, 1], "epochs": 2,
    "batch_size": 32, "threads": 1, "log_every": 5,
    "optimizers": [
        {"preset": "koala++", "sigma": 0.1, "q": 0.5, "lr": 2.0},
        {"preset": "koala++-lr", "memory": 3, "sigma": 0.1, "q": 0.5, "lr": 2.0},
    ],
})
config.check()
out = Path(tempfile.mkdtemp(prefix="kalmanopt-tutorial-"))
outcome = run_experiment(config, out, progress=False)
print("written:", sorted(p.name for p in outcome.plots))

for name in ("diagnostics.png", "diagnostics-koala++-lr.png"):
    image = plt.imread(out / name)
    fig, ax = plt.subplots(figsize=(12, 12 * image.shape[0] / image.shape[1]))
    ax.imshow(image)
    ax.axis("off")
    fig.tight_layout()

# %%
# The first figure compares optimizers: where their ``S`` and gain scales sit, how their
# coefficients behave, and the cumulative skipped layers. The second shows one run layer by
# layer: here the low-rank surrogate's ``rows kept`` — how many constraint rows (at most
# ``memory``) its last step used after the conditioning test — is the quantity ``koala++`` does
# not have.
#
# The numbers behind every figure are in ``metrics.jsonl`` (``kind = "diagnostics"``), one JSON
# object per record, for your own analysis.
