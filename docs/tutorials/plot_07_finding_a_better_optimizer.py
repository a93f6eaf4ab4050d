"""
7. How to find a better optimizer with kalmanopt
================================================

A new optimizer is a claim about a comparison, and most such claims are artefacts of the
comparison: one learning rate that suits one optimizer, one seed, a baseline left at its
defaults. kalmanopt's parts make the variants cheap to write. This tutorial shows the other half,
how to compare them so that a difference means something:

1. start from the best composition you have (here ``koala-adam-steady``: Adam read as a Kalman
   filter, :doc:`the research page <../research>` derives it);
2. change **one part at a time**: the covariance recursion, the noise estimate, the dynamics;
3. give every variant **and the baseline** the same budget: a five-point log-spaced learning-rate
   sweep, a pick on validation loss, then several seeds at the pick (``kalmanopt tune``,
   :doc:`the tuning page <../tuning>`);
4. call a variant better only where it beats the baseline by more than the seeds' spread.

The whole ablation is one TOML grid; it trains 36 small runs on scikit-learn's handwritten
digits in well under a minute on a CPU.
"""

# %%
# The grid
# --------
#
# Each ``[[optimizers]]`` entry is one variant. A preset is a composition of parts; a variant
# swaps one of them, either as another preset that differs in that part alone, or spelled out
# part by part with ``compose``. Every entry sweeps ``lr`` over the same five values, and AdamW,
# the baseline, gets the same sweep. Save the text as ``ablation.toml`` and
# ``kalmanopt tune ablation.toml`` reruns it.

import json
import math
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from kalmanopt.runner import parse_config
from kalmanopt.runner.config import parse_toml
from kalmanopt.runner.tuning import run_tuning

GRID = """
name = "find-an-optimizer"
task = "digits"
model = "mlp"
seeds = [0, 1]
epochs = 4
batch_size = 32
threads = 1
log_every = 50

[model_options]
hidden = 64

[[optimizers]]            # the baseline
torch = "adamw"
weight_decay = 0.1
lr = {logspace = [3e-4, 3e-2, 5]}

[[optimizers]]            # the composition to improve on
preset = "koala-adam-steady"
lr = {logspace = [3e-4, 3e-2, 5]}

[[optimizers]]            # the covariance: its Riccati fixed point by Newton's method
preset = "koala-adam"
label = "covariance = newton"
lr = {logspace = [3e-4, 3e-2, 5]}

[[optimizers]]            # the covariance: the filter's own recursion
preset = "koala-adam-riccati"
label = "covariance = riccati"
lr = {logspace = [3e-4, 3e-2, 5]}

[[optimizers]]            # the noise: from the gradient filter's innovations
preset = "koala-adam-innovation"
label = "noise = innovation"
lr = {logspace = [3e-4, 3e-2, 5]}

[[optimizers]]            # the dynamics: a plain random walk, no decoupled weight decay
compose = {measurement = "gradient", dynamics = "random_walk", surrogate = "adaptive_diagonal", covariance = "steady"}
label = "dynamics = random_walk"
q = 1e-3
sigma = 0.03
lr = {logspace = [3e-4, 3e-2, 5]}
"""

config = parse_config(parse_toml(GRID, "the ablation grid"))
config.check()  # every name, keyword and range, before anything trains
out = Path(tempfile.mkdtemp(prefix="kalmanopt-tutorial-"))
outcome = run_tuning(config, out / "ablation")
print((out / "ablation" / "tuning.md").read_text())

# %%
# Reading the table
# -----------------
#
# Each row shows its sweep (the pick in bold), the pick, and the validation loss over the seeds
# at the pick. Three things to look for:
#
# - **Is the pick inside the sweep?** A best learning rate on the sweep's edge says the optimum
#   may lie beyond it, and ``kalmanopt tune`` refuses to pick there: a comparison at an edge
#   compares sweeps, not optimizers. The warning names the variant and the way to extend.
# - **How wide is the spread?** With two seeds the standard deviation is rough, but it is the
#   scale against which every difference must be read.
# - **Does any variant beat the baseline by more than that spread?**
#
# Here the variants without decoupled weight decay had their best learning rate on the upper
# edge. We extend that one sweep upwards (a new folder: a folder keeps the sweep it was trained
# with) and tune it again.

warned = [t for t in json.loads((out / "ablation" / "tuning.json").read_text())["optimizers"] if t["pick"] is None]
print("refused picks:", [t["label"] for t in warned])

extended = parse_toml(GRID, "the ablation grid")
extended["name"] = "find-an-optimizer-extended"
extended["optimizers"] = [dict(entry, lr={"logspace": [3e-3, 3e-1, 5]}) for entry in extended["optimizers"]
                          if entry.get("label") in {t["label"] for t in warned}]
if extended["optimizers"]:
    wider = parse_config(extended)
    wider.check()
    run_tuning(wider, out / "extended")
    print((out / "extended" / "tuning.md").read_text())

# %%
# Before crediting a part, give the baseline the same change
# -----------------------------------------------------------
#
# The random-walk variant differs from ``koala-adam-steady`` in more than its dynamics: without
# the decaying random walk it has no weight decay at all. A difference it shows may belong to
# weight decay, a hyper-parameter every baseline has, not to the Kalman part. So the control is
# AdamW without weight decay, on the same wider sweep.

control = parse_toml(GRID, "the ablation grid")
control["name"] = "find-an-optimizer-control"
control["optimizers"] = [{"torch": "adamw", "label": "adamw, weight_decay=0", "weight_decay": 0.0,
                          "lr": {"logspace": [3e-3, 3e-1, 5]}}]
control_config = parse_config(control)
control_config.check()
run_tuning(control_config, out / "control")

# %%
# The sweeps, drawn
# -----------------
#
# The tables' numbers as curves: validation loss against learning rate at seed 0, one line per
# variant, and at each pick the mean and spread over the seeds. Curves that lie on top of each
# other near their minima are variants that the task cannot tell apart.


def tuned(folder: Path) -> list[dict]:
    return json.loads((folder / "tuning.json").read_text())["optimizers"]


results = {t["label"]: t for t in tuned(out / "ablation")}
for folder in ("extended", "control"):
    if (out / folder / "tuning.json").exists():
        results.update({t["label"]: t for t in tuned(out / folder)})

fig, ax = plt.subplots(figsize=(7.5, 4.2))
for label, t in results.items():
    points = sorted((run["setting"]["lr"], run["val_loss"]) for run in t["sweep"]
                    if run["val_loss"] is not None and math.isfinite(run["val_loss"]))
    line, = ax.plot(*zip(*points), marker="o", ms=3, label=label, lw=2.5 if label.startswith("adamw") else 1.2,
                    ls="--" if label.startswith("adamw") else "-")
    if t["pick"] is not None:
        losses = [s["val_loss"] for s in t["seeds"]]
        mean = sum(losses) / len(losses)
        ax.errorbar([t["pick"]["lr"]], [mean], yerr=[(max(losses) - min(losses)) / 2], color=line.get_color(),
                    capsize=4, marker="D")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("learning rate")
ax.set_ylabel("validation loss (seed 0; ◆ the pick over seeds)")
ax.set_title("one part changed at a time, the same sweep each")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# The verdict, computed
# ---------------------
#
# Each variant against its baseline: the difference of the means at the picks, against the
# larger of the two seed spreads (standard deviations). "better" or "worse" only beyond it.


def at_pick(label: str) -> tuple[float, float]:
    losses = [s["val_loss"] for s in results[label]["seeds"]]
    mean = sum(losses) / len(losses)
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / max(len(losses) - 1, 1))
    return mean, std


def verdict(label: str, baseline: str) -> str:
    (m, s), (mb, sb) = at_pick(label), at_pick(baseline)
    spread = max(s, sb)
    word = "within the spread" if abs(m - mb) <= spread else ("better" if m < mb else "worse")
    return f"{label:26s} {m:.4f} against {baseline} {mb:.4f}: {m - mb:+.4f} (spread {spread:.4f}) → {word}"


picked = [label for label, t in results.items() if t["pick"] is not None]
for label in picked:
    if not label.startswith("adamw"):
        print(verdict(label, "adamw"))
if "dynamics = random_walk" in picked and "adamw, weight_decay=0" in picked:
    print(verdict("dynamics = random_walk", "adamw, weight_decay=0"))

# %%
# What this ablation says
# -----------------------
#
# On this task the covariance recursion and the noise estimate do not separate from AdamW or
# from each other: their differences are inside the seeds' spread. The one variant that moves
# is the one without weight decay, and the control says how much of that belongs to the part:
# read its last line against AdamW without weight decay. A negative result of this kind is a
# result. It sends the search elsewhere: to parts that change what the filter measures or how
# it represents the covariance (the structured surrogates of :doc:`tutorial 6
# <plot_06_structured_covariance>`), and to tasks large enough to separate them.
#
# The same loop scales up unchanged: the LM benchmark's grid (``configs/lm-tuning.toml``) is this
# file with another task and ``--device cuda``, and :doc:`the research page <../research>` keeps
# the record of every hypothesis tried on it, including those that failed. Two seeds and four
# epochs make this a demonstration of the method; a claim needs the benchmark's three seeds and
# its full schedule.
