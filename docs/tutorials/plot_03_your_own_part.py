"""
3. Writing your own part, and ablating it
=========================================

A new variant of the KOALA family is one new *part* composed with the existing ones (the
:doc:`design page <../design>` lists the parts and their contract). This tutorial writes a
covariance surrogate twice: first as a quick **per-layer prototype** (one method, ``gain()``, run
by the reference engine), then as the **same part through the two-pass contract**, which every
engine runs, the fast multi-tensor ``foreach`` engine included. It checks the part against the
exact EKF where it should be exact, shows the two versions agree, and ablates the fast one against
the presets with the experiment runner behind ``kalmanopt run``.

The question we ask: ``koala-v`` keeps **one** scalar :math:`p` for all layers of a group
(:ref:`derivation §2 <derivation-koala-v>`), and its posterior takes the smallest variance over
the layers. Does a scalar **per layer** do better?
"""

# %%
# A quick prototype, per layer
# ----------------------------
#
# The quickest way to try an idea is one method, ``gain``: given one layer's measurement Jacobian
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
from kalmanopt.engines import available_implementations
from kalmanopt.plan import contract_gap
from kalmanopt.program import Vec
from kalmanopt.runner import parse_config, run_experiment
from kalmanopt.state import ScalarState, StateTable


@kalmanopt.register_part("surrogate", "layer-scalar-prototype", replace=True)
class LayerScalarPrototype(kalmanopt.CovarianceSurrogate):
    """P = p_ℓ I with its own p_ℓ per layer (koala-v shares one p across the layers); per layer."""

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

prototype = kalmanopt.compose(surrogate="layer-scalar-prototype", name="layer-scalar-prototype")
print(prototype)
print("hyper-parameters:", sorted(prototype.hyperparameters()))

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
opt = kalmanopt.KalmanOptimizer(model.parameters(), prototype, sigma=0.5, q=0.1, r=0.2, lr=1.0,
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
# The same part through the contract
# ----------------------------------
#
# The prototype runs on the reference engine only: it is a Python function of one layer, called
# once per layer. The fast engines need the part's mathematics as a **declaration** they can run
# for all layers at once (:ref:`the part contract <design-contracts>`):
#
# - its **state table**: here one per-layer scalar ``p``, starting at ``sigma``;
# - the **reductions** (per-layer sums) it needs: only :math:`\lVert H_\ell\rVert^2`, which the
#   measurement provides as ``hh``;
# - its **coefficients** as one batched function of a :class:`~kalmanopt.contract.CoefficientStage`: every
#   tensor has shape ``[layers]``, so the formula is the prototype's, without the loop;
# - its **element-wise program** (none here: :math:`p_\ell` is a scalar) and the gain's
#   **direction**, :math:`H`.
#
# The engines do the rest: the dynamics correct :math:`\theta` along the direction with
# :math:`\eta_k L_\ell K`, and the new ``p`` is kept only where a layer was not skipped.


@kalmanopt.register_part("surrogate", "layer-scalar", replace=True)
class LayerScalarSurrogate(kalmanopt.CovarianceSurrogate):
    """P = p_ℓ I with its own p_ℓ per layer, declared through the two-pass contract."""

    hyperparameters = LayerScalarPrototype.hyperparameters

    def state_table(self):
        # p_0 = sigma, one scalar per layer
        return StateTable(scalars=(ScalarState("p", "sigma", "the layer's variance p_ℓ"),))

    def coefficients(self, b):
        # all layers at once: b.layer["p"], b.red["hh"], b.R and the results have shape [layers]
        p_hat = b.layer["p"] + float(b.hp["q"])   # P̂ = (p + Q) I
        hh = b.red["hh"]
        S = p_hat * hh + b.R                      # S = H P̂ Hᵀ + R
        b.S = S
        b.gain = [p_hat / S]                      # K = (p̂ / S) · H
        b.new_layer["p"] = p_hat - p_hat**2 * hh / S
        if b.diagnostics:
            b.info["p"] = b.new_layer["p"]

    def direction(self, hp):
        return Vec("H")


layer_scalar = kalmanopt.compose(surrogate="layer-scalar", name="layer-scalar")
print("prototype:", contract_gap(prototype))
print("contract: ", contract_gap(layer_scalar))
model = torch.nn.Linear(6, 1)
for comp in (prototype, layer_scalar):
    group = kalmanopt.KalmanOptimizer(model.parameters(), comp).param_groups[0]
    print(f"{comp.name}: engines that can run it:",
          [name for name, why in available_implementations(comp, group).items() if why is None])

# %%
# Asking a fast engine for the prototype is an error that says what the part lacks:

try:
    kalmanopt.KalmanOptimizer(model.parameters(), prototype, implementation="foreach").step(loss=0.0)
except ValueError as err:
    print(err)

# %%
# The two versions agree
# ----------------------
#
# The prototype on the reference engine and the contract version on the ``foreach`` engine, on
# the same small network, from the same start, for thirty steps:


def train(composition, implementation, steps=30):
    """The parameters after a few steps on a fixed regression (float64)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    X, y = torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    opt = kalmanopt.KalmanOptimizer(net.parameters(), composition, implementation=implementation,
                                    sigma=0.1, q=0.5, lr=1.0)
    for _ in range(steps):
        losses = (net(X) - y).pow(2).squeeze(1)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


theta_prototype = train(prototype, "reference")
theta_contract = train(layer_scalar, "foreach")
difference = float((theta_prototype - theta_contract).abs().max())
print(f"largest difference of the parameters after 30 steps: {difference:.3g}")
torch.testing.assert_close(theta_contract, theta_prototype, rtol=1e-12, atol=1e-14)

# %%
# The per-layer API still works for the contract version: the base class's ``gain()`` runs the
# declaration on one layer, so code (and tests) written against the prototype's interface take
# either part:

H = torch.randn(10, dtype=torch.float64)
R = torch.tensor(0.2, dtype=torch.float64)
ctx = kalmanopt.UpdateContext(group_state={}, F=torch.ones(1, 1, dtype=torch.float64),
                              Q=torch.tensor([0.1], dtype=torch.float64))
hp = {"sigma": 0.5, "q": 0.1}
state_prototype, state_contract = {}, {}
gain_prototype = prototype.surrogate.gain(ctx, state_prototype, H, H, R, hp)
gain_contract = layer_scalar.surrogate.gain(ctx, state_contract, H, H, R, hp)
print(f"K coefficient: {float(gain_prototype.coefficients[0]):.12f} (prototype), "
      f"{float(gain_contract.coefficients[0]):.12f} (contract)")
print(f"p after the step: {float(state_prototype['p']):.12f} (prototype), {float(state_contract['p']):.12f} (contract)")
assert torch.allclose(gain_prototype.coefficients, gain_contract.coefficients, rtol=1e-12)
assert torch.allclose(state_prototype["p"], state_contract["p"], rtol=1e-12)

# %%
# Ablate it with the runner
# -------------------------
#
# ``kalmanopt run CONFIG.toml`` trains a grid of optimizers over seeds and writes tables and
# plots (:doc:`the runner page <../runner>`). An optimizer entry is a preset, a torch baseline, or
# a composition of parts by name — which is how a new part enters an ablation. The config below
# compares the contract version of the new surrogate, on the ``foreach`` engine, with ``koala-v``
# on scikit-learn's handwritten digits, with the same ``sigma``, ``q`` and ``lr`` so that only the
# sharing of :math:`p` changes, and adds
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
#    implementation = "foreach"
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
        {"compose": {"surrogate": "layer-scalar"}, "label": "layer-scalar", "implementation": "foreach", **shared},
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
# (``configs/digits-tuning.toml`` shows how). What the tutorial shows is the loop: a prototype in
# a few lines, a test against the exact EKF, the same part declared through the contract and
# checked against the prototype, an ablation by name on a fast engine. The
# :doc:`extending page <../extending>` goes further: a part with state vectors and an element-wise
# program of its own, shipped as a plugin package. The
# :doc:`next tutorial <plot_04_reading_diagnostics>` reads the diagnostics the runner recorded.
