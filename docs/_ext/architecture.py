"""Draws the architecture diagram of docs/design.md (``docs/img/architecture.svg``) with matplotlib.

Run by docs/conf.py on every build, and by hand with ``python docs/_ext/architecture.py``. The SVG
is deterministic (no date, a fixed id salt), so redrawing an unchanged diagram leaves the
committed file unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

#: (key, x, y, width, height, title, body, colour): boxes in axes units (0..100 × 0..62)
BOXES = [
    ("user", 2, 51, 28, 9, "your training loop",
     "create(name, params, **hp)\nloss.backward()\nopt.step(loss=losses)", "#e8eef7"),
    ("runner", 38, 51, 30, 9, "kalmanopt run (runner)",
     "config → tasks, models\n→ train_run (seeds, grid)\n→ results, tables, plots", "#e8eef7"),
    ("analysis", 75, 51, 23, 9, "kalmanopt.analysis",
     "ExactEKF, Hessians,\nper-sample gradients,\na preset beside the EKF", "#e8eef7"),
    ("registry", 2, 35, 28, 9, "registry",
     "parts and presets by name;\nplugins: entry points\n'kalmanopt.plugins'", "#fdf3e1"),
    ("optimizer", 38, 34, 30, 11, "KalmanOptimizer",
     "a torch.optim.Optimizer:\nparam groups, checks, state_dict;\n"
     "owns opt.runtime: every cache\nand flag of its steps",
     "#fde2e2"),
    ("driver", 75, 34, 23, 11, "step driver",
     "engines.step → graphs\n→ driver: phases, step\ncode (non-finite skips),\ncounters, warnings", "#fde2e2"),
    ("composition", 2, 12, 28, 16, "Composition (a preset)",
     "measurement + dynamics\n+ surrogate (+ estimator)\nchecked when built;\nkalmanopt.plan joins the\n"
     "parts' reductions, programs\nand batched coefficients", "#e6f4e6"),
    ("engines", 38, 12, 30, 16, "engines (stateless, no part named)",
     "reference: per layer, host branches;\n           gain() prototypes\nforeach:   multi-tensor torch ops\n"
     "fused:     Triton kernels generated\n           from the declarations\n"
     "None:      the fastest that runs it", "#efe6f7"),
    ("state", 75, 12, 23, 16, "optimizer.state",
     "per layer (parameter):\n v, H, S (product),\n p (diagonal), u, w̄,\n row1.., prod1.. (lowrank)\n"
     "per group 'groupN':\n R, P (scalar, block),\n q_w, counters, steps", "#f2f2f2"),
    ("parts", 2, 0, 96, 8, "parts declare the two-pass contract (kalmanopt.contract, .program, .state)",
     "state_table · reductions · coefficients(CoefficientStage) for all layers at once · element-wise program · "
     "direction / correction\nmeasurement: loss;  dynamics: random_walk, momentum;  "
     "surrogate: scalar, block, diagonal, product, lowrank;  estimator: vanilla, symmetric",
     "#e6f4e6"),
]

#: (from, to, label)
ARROWS = [
    ("user", "optimizer", "step()"),
    ("runner", "optimizer", "builds, drives"),
    ("runner", "analysis", "hook"),
    ("user", "registry", "by name"),
    ("registry", "composition", "build()"),
    ("composition", "optimizer", "filter="),
    ("optimizer", "driver", "step()"),
    ("driver", "engines", "plan stages, per group"),
    ("engines", "composition", "executes its plan"),
    ("engines", "state", "reads, writes"),
    ("composition", "parts", "instances of"),
]


def _anchor(box: tuple, toward: tuple) -> tuple[float, float]:
    """The point on ``box``'s border facing the centre of ``toward``."""
    _, x, y, w, h, *_ = box
    _, tx, ty, tw, th, *_ = toward
    cx, cy, ox, oy = x + w / 2, y + h / 2, tx + tw / 2, ty + th / 2
    dx, dy = ox - cx, oy - cy
    if abs(dy) * w >= abs(dx) * h:  # leave through the top or bottom edge
        return cx + (dx / abs(dy)) * h / 2 if dy else cx, y + h if dy > 0 else y
    return x + w if dx > 0 else x, cy + (dy / abs(dx)) * w / 2


def draw(path: str | Path) -> Path:
    """Draw the diagram into ``path`` (SVG) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "kalmanopt-architecture"
    plt.rcParams["svg.fonttype"] = "path"  # glyphs as paths: the same look in every browser
    fig, ax = plt.subplots(figsize=(12, 7.6))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 62)
    ax.axis("off")
    boxes = {b[0]: b for b in BOXES}
    for _key, x, y, w, h, title, body, colour in BOXES:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3,rounding_size=0.8",
                                    facecolor=colour, edgecolor="#555555", linewidth=1.0))
        ax.text(x + w / 2, y + h - 1.2, title, ha="center", va="top", fontsize=10.5, weight="bold")
        ax.text(x + 1.0, y + h - 3.4, body, ha="left", va="top", fontsize=8.5, family="monospace",
                linespacing=1.35)
    for src, dst, label in ARROWS:
        start, end = _anchor(boxes[src], boxes[dst]), _anchor(boxes[dst], boxes[src])
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#333333",
                                     linewidth=1.0, shrinkA=2, shrinkB=2))
        if label:
            horizontal = abs(end[1] - start[1]) < abs(end[0] - start[0])
            ax.text((start[0] + end[0]) / 2 + (0 if horizontal else 0.6),
                    (start[1] + end[1]) / 2 + (0.8 if horizontal else 0), label, fontsize=8, color="#333333",
                    style="italic", ha="center" if horizontal else "left", va="bottom" if horizontal else "center",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return path


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "img" / "architecture.svg"
    print(draw(target))
