"""
3. Writing your own part, and ablating it
=========================================

A new variant of the KOALA family is one new *part* composed with the existing ones (the
:doc:`design page <../design>` lists the parts and their contracts). This tutorial writes a
covariance surrogate, checks it against the exact EKF where it should be exact, and ablates it
against the presets with the experiment runner behind ``kalmanopt run``.

The question we ask: ``koala-v`` keeps **one** scalar :math:`p` for all layers of a group
(:ref:`derivation §2 <derivation-koala-v>`), and its posterior takes the smallest variance over
the layers. Does a scalar **per layer** do better?
"""

# %%
# The part
# --------
#
# A surrogate implements one required method, ``gain``: given the layer's measurement Jacobian
# :math:`H`, the raw gradient :math:`g` and the noise :math:`R`, return the gain in factored
# form (``Gain(direction, coefficients, S)``, :math:`K = \text{coefficients}[0]\cdot\text{direction}`)
# and store the layer's posterior in ``layer_state``. With :math:`P_\ell = p_\ell I`:
#
# .. math::
#
#    \hat p = p_\ell + Q, \quad S = \hat p \lVert H\rVert^2 + R, \quad K = \hat p H^\top / S, \quad
#    p_\ell \leftarrow \hat p - \hat p^2 \lVert H\rVert^2 / S
#
# — the exact EKF for :math:`P = p I` along the measured direction, as ``koala-v`` does, but
# without sharing. The process noise :math:`Q` comes from the dynamics (``ctx.Q``); the initial
# :math:`p` is a hyper-parameter, ``sigma``, declared with its valid range so the optimizer
# checks it.

import math
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import kalmanopt
from kalmanopt.analysis import exact_ekf_update
from kalmanopt.runner import parse_config, run_experiment


@kalmanopt.register_part("surrogate", "layer-scalar", replace=True)
class LayerScalarSurrogate(kalmanopt.CovarianceSurrogate):
    """P = p_ℓ I with its own p_ℓ per layer (koala-v shares one p across the layers)."""

    hyperparameters = (
        kalmanopt.HyperParameter("sigma", 0.1, kalmanopt.Range(0.0, low_open=True), "initial p of every layer"),
    )

    def gain(self, ctx, layer_state, H, g, R, hp):
        p = layer_state.get("p")
        if p is None:  # the layer's first update: p_0 = sigma
            p = torch.tensor(float(hp["sigma"]), dtype=H.dtype, device=H.device)
        p_hat = p + ctx.Q[0]                       # P̂ = (p + Q) I
        hh = torch.dot(H, H)
        S = p_hat * hh + R                         # S = H P̂ Hᵀ + R
        layer_state["p"] = p_hat - p_hat**2 * hh / S   # the posterior's variance along H
        return kalmanopt.Gain(direction=H, coefficients=(p_hat / S).reshape(1), S=S,
                              diagnostics={"p": layer_state["p"]})


# %%
# ``replace=True`` only lets this script run twice in one process; a package would register the
# name once. The part is now available by name everywhere: ``kalmanopt.compose`` builds a
# composition from part names, and ``kalmanopt.KalmanOptimizer`` runs it.

composition = kalmanopt.compose(surrogate="layer-scalar", name="layer-scalar")
print(composition)
print("hyper-parameters:", sorted(composition.hyperparameters()))

# %%
# Test it against the exact EKF
# -----------------------------
#
# On a model with one parameter tensor, a per-layer scalar surrogate must give the exact EKF's
# innovation variance :math:`S` whenever the exact :math:`P` is still a multiple of the identity
# — at the first step, from :math:`P_0 = \sigma I`. And its :math:`p` after the step must be the
# exact posterior's variance along :math:`H`. Checking such identities on tiny problems is how
# every built-in part is tested (``tests/test_exact_ekf.py``).

torch.manual_seed(0)
model = torch.nn.Linear(6, 1, bias=False).double()
x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
opt = kalmanopt.KalmanOptimizer(model.parameters(), composition, sigma=0.5, q=0.1, r=0.2, lr=1.0,
                                implementation="reference", track_diagnostics=True)
losses = 0.5 * (model(x) - y).pow(2).squeeze(1)
opt.zero_grad()
losses.mean().backward()
H = model.weight.grad.reshape(-1).clone()  # no weight decay: H = g
opt.step(loss=losses)

exact = exact_ekf_update(0.5 * torch.eye(6, dtype=torch.float64), H, R=0.2, q=0.1)
ours = opt.diagnostics()["layers"]["group0/param0"]
print(f"S: ours {float(ours['S']):.12f}, exact {float(exact.S):.12f}")
print(f"p after the step: ours {float(ours['p']):.12f}, exact H P Hᵀ/|H|² "
      f"{float(H @ exact.P @ H / (H @ H)):.12f}")
assert math.isclose(ours["S"], float(exact.S), rel_tol=1e-12)
assert math.isclose(ours["p"], float(H @ exact.P @ H / (H @ H)), rel_tol=1e-12)

# %%
# Ablate it with the runner
# -------------------------
#
# ``kalmanopt run CONFIG.toml`` trains a grid of optimizers over seeds and writes tables and
# plots (:doc:`the runner page <../runner>`). An optimizer entry is a preset, a torch baseline, or
# a composition of parts by name — which is how a new part enters an ablation. The config below
# compares the new surrogate with ``koala-v`` on scikit-learn's handwritten digits, with the same
# ``sigma``, ``q`` and ``lr`` so that only the sharing of :math:`p` changes, and adds
# ``koala-diag`` at the setting of the default ablation (``configs/default.toml``) for reference.
# As a TOML file it reads:
#
# .. code-block:: toml
#
#    name = "layer-scalar"
#    task = "digits"
#    model = "mlp"
#    seeds = [0, 1]
#    epochs = 4
#    batch_size = 32
#    threads = 1
#
#    [[optimizers]]
#    compose = { surrogate = "layer-scalar" }
#    label = "layer-scalar"
#    sigma = 0.1
#    q = 0.5
#    lr = 2.0
#
#    [[optimizers]]
#    preset = "koala-v"
#    sigma = 0.1
#    q = 0.5
#    lr = 2.0
#
#    [[optimizers]]
#    preset = "koala-diag"
#    sigma = 0.1
#    q = 0.5
#    lr = 1.0
#
# ``kalmanopt run layer-scalar.toml --quick`` runs it from the command line once the part is
# registered in that process — by a package's ``kalmanopt.plugins`` entry point
# (:doc:`extending <../extending>`). Here the part lives in this script, so we use the runner's
# Python API, which the command line calls: :func:`~kalmanopt.runner.config.parse_config` checks
# everything before any training, :func:`~kalmanopt.runner.experiment.run_experiment` runs the
# grid. Two seeds and a few epochs take about half a minute on a CPU.

shared = {"sigma": 0.1, "q": 0.5, "lr": 2.0}
config = parse_config({
    "name": "layer-scalar", "task": "digits", "model": "mlp", "seeds": [0, 1], "epochs": 4,
    "batch_size": 32, "threads": 1, "log_every": 10,
    "optimizers": [
        {"compose": {"surrogate": "layer-scalar"}, "label": "layer-scalar", **shared},
        {"preset": "koala-v", **shared},
        {"preset": "koala-diag", **shared, "lr": 1.0},
    ],
})
config.check()
out = Path(tempfile.mkdtemp(prefix="kalmanopt-tutorial-"))
outcome = run_experiment(config, out, progress=False)
print(f"trained {outcome.trained} runs into {outcome.out}")
print((out / "summary.md").read_text())

# %%
# ``summary.md`` is the table above (mean ± std over seeds, best first); ``results.csv`` and
# ``results.json`` hold every number, ``metrics.jsonl`` every logged step. The learning curves
# the runner drew:

image = plt.imread(out / "curves.png")
fig, ax = plt.subplots(figsize=(11, 11 * image.shape[0] / image.shape[1]))
ax.imshow(image)
ax.axis("off")
fig.tight_layout()

# %%
# With two seeds and four epochs this is a smoke test, not a result: for a claim, run more seeds
# and the full schedule, and tune each optimizer's ``lr`` and ``q`` with a grid
# (``configs/digits-tuning.toml`` shows how). What the tutorial shows is the loop: a part in a few
# lines, a test against the exact EKF, an ablation by name. The
# :doc:`next tutorial <plot_04_reading_diagnostics>` reads the diagnostics the runner recorded.
