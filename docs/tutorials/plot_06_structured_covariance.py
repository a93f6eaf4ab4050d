"""
6. Diagonal, factored and Kronecker covariance on one task
==========================================================

Three covariance surrogates of one KOALA filter, the same loss measurement and random walk
around them (:doc:`the structured covariance page <../structured>` derives each):

- ``koala-diag``: one variance per weight, :math:`P = \\operatorname{diag}(p)`;
- ``koala-factored``: the same diagonal kept as a row and a column factor,
  :math:`p_{ij} = r_i c_j / \\operatorname{mean}(r)`, so a weight matrix keeps :math:`m + n` numbers;
- ``koala-kron``: a full covariance over the rows and one over the columns,
  :math:`P \\approx A \\otimes B`, whose gain is the two-sided preconditioned gradient
  :math:`\\hat A H \\hat B`.

We train the same small network on scikit-learn's handwritten digits with each, and with AdamW,
every optimizer at the best learning rate of the same small sweep (a comparison at one learning
rate says more about the learning rate than the optimizer), and look at the curves and at what
each keeps.
"""

# %%
# The task and the training loop
# ------------------------------

import math

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits

import kalmanopt

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
train_idx, val_idx = perm[:1400], perm[1400:]

STEPS, BATCH = 300, 64


def model_for(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))


def train(name: str, lr: float, seed: int = 0) -> tuple[list[float], float, torch.optim.Optimizer]:
    """Validation loss every 20 steps, the final one, and the optimizer."""
    model = model_for(seed)
    if name == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    else:
        opt = kalmanopt.create(name, model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(STEPS):
        idx = train_idx[torch.randint(len(train_idx), (BATCH,), generator=g)]
        losses = torch.nn.functional.cross_entropy(model(X[idx]), y[idx], reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        if name == "AdamW":
            opt.step()
        else:
            opt.step(loss=losses.detach())
        if step % 20 == 19:
            with torch.no_grad():
                val = float(torch.nn.functional.cross_entropy(model(X[val_idx]), y[val_idx]))
            curve.append(val if math.isfinite(val) else float("nan"))
    return curve, curve[-1], opt


# %%
# The same learning-rate sweep for each
# -------------------------------------
#
# Four log-spaced learning rates each; the pick is the lowest final validation loss.

SWEEPS = {
    "AdamW": [1e-3, 3e-3, 1e-2, 3e-2],
    "koala-diag": [0.1, 0.3, 1.0, 3.0],
    "koala-factored": [0.1, 0.3, 1.0, 3.0],
    "koala-kron": [0.3, 1.0, 3.0, 10.0],
}
best = {}
for name, lrs in SWEEPS.items():
    finals = {lr: train(name, lr)[1] for lr in lrs}
    pick = min(finals, key=lambda lr: finals[lr] if math.isfinite(finals[lr]) else math.inf)
    best[name] = pick
    print(f"{name:15s} " + "  ".join(f"lr {lr:g}: {v:.3f}" for lr, v in finals.items()) + f"   -> {pick:g}")

# %%
# Curves at each one's best learning rate
# ---------------------------------------

fig, ax = plt.subplots(figsize=(6.4, 4))
kept = {}
for name, lr in best.items():
    curve, final, opt = train(name, lr)
    kept[name] = opt
    ax.plot([20 * (i + 1) for i in range(len(curve))], curve, label=f"{name} (lr {lr:g}): {final:.3f}")
ax.set_xlabel("step")
ax.set_ylabel("validation loss")
ax.set_yscale("log")
ax.set_title("digits, MLP 64-128-10, each at its best learning rate")
ax.legend()
fig.tight_layout()

# %%
# What each keeps
# ---------------
#
# The first weight is 128 × 64. ``koala-diag`` keeps a variance per weight (8192 numbers),
# ``koala-factored`` a row and a column factor (128 + 64), ``koala-kron`` a 128 × 128 and a 64 × 64
# factor: more than the diagonal here, but it couples every pair of rows and every pair of columns.
# (Each also keeps, between steps, a workspace vector the size of the layer, which a state dict
# never holds.)

for name in ("koala-diag", "koala-factored", "koala-kron"):
    saved = kept[name].state_dict()["state"][0]
    print(f"{name:15s}", {key: tuple(t.shape) for key, t in saved.items()},
          "numbers:", sum(t.numel() for t in saved.values()))
