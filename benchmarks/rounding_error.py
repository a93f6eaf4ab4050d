"""The error of bfloat16 state: a running average stored in float32, in bf16 rounded to nearest, and in bf16
rounded stochastically (kalmanopt's ``state_dtype="bfloat16"``), against the analysis in
docs/state-precision.md.

The recursion is the one every stored filter vector follows, an exponential average
``m ← β m + (1 − β) g`` (KOALA-M's velocity, koala-adam's moments, KOALA++'s carried product, with their own
β), over ``n`` independent coordinates, for ``β`` in 0.9, 0.99, 0.999. The average starts at 1 and its
input has mean 1.5 (a shift it must follow) and noise of standard deviation 0.1. After ``steps`` steps
the table gives, per storage, the mean of the stored average over the coordinates minus the float32 one
(the bias) and the root-mean-square difference relative to it, beside the RMS that the analysis predicts
for stochastic rounding (:func:`predicted_rms`: with ``u`` bf16's gap at the value, the smaller of
``u / √6 / √(1 − β²)``, where each write moves by a gap or more, and ``√(u · E|g − m| / 2)``, where it moves
by much less).

Usage::

    python benchmarks/rounding_error.py --plot docs/img/rounding_error.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kalmanopt.engines.rounding import round_into  # noqa: E402


def run(beta: float, steps: int, n: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """The three stored averages at every step (their mean over coordinates), and the final vectors."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.ones(n)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    stochastic = torch.ones(n, dtype=torch.bfloat16)
    means: dict[str, list[float]] = {"float32": [], "bf16 nearest": [], "bf16 stochastic": []}
    for k in range(steps):
        g = 1.5 + 0.1 * torch.randn(n, generator=gen)
        full = beta * full + (1 - beta) * g
        nearest = (beta * nearest.float() + (1 - beta) * g).to(torch.bfloat16)
        new = beta * stochastic.float() + (1 - beta) * g
        round_into(stochastic, new, torch.tensor(k))
        means["float32"].append(float(full.mean()))
        means["bf16 nearest"].append(float(nearest.float().mean()))
        means["bf16 stochastic"].append(float(stochastic.float().mean()))
    return {"means": means, "final": {"float32": full, "bf16 nearest": nearest.float(),
                                      "bf16 stochastic": stochastic.float()}}  # type: ignore[dict-item]


def predicted_rms(beta: float, value: float, spread: float) -> float:
    """The analysis's RMS error of a stochastically rounded average, relative to ``value`` (its level), with
    ``spread`` = E|g − m| (docs/state-precision.md): the smaller of the two regimes' figures."""
    gap = 2.0 ** (math.floor(math.log2(abs(value))) - 7)  # bf16's gap at the value (8 significant bits)
    large_steps = gap / math.sqrt(6) / math.sqrt(1 - beta ** 2)  # each write's error of variance gap²/6
    small_steps = math.sqrt(gap * spread / 2)  # writes moving by (1 − β)|g − m| ≪ gap: variance gap·step
    return min(large_steps, small_steps) / abs(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--n", type=int, default=20000, help="coordinates")
    parser.add_argument("--plot", type=Path, default=None, help="write the averages' curves to this PNG")
    args = parser.parse_args()
    betas = (0.9, 0.99, 0.999)
    results = {beta: run(beta, args.steps, args.n) for beta in betas}
    spread = 0.1 * math.sqrt(2 / math.pi)  # E|g − m| in the steady state: the input's noise
    lines = [f"An average m ← β m + (1 − β) g over {args.n} coordinates, {args.steps} steps from m = 1 towards "
             f"E g = 1.5 (noise 0.1); torch {torch.__version__}.", "",
             "| β | storage | final mean | bias against float32 | RMS relative to float32 | predicted RMS |",
             "|---|---|---|---|---|---|"]
    for beta in betas:
        final = results[beta]["final"]
        ref = final["float32"]
        for name in ("float32", "bf16 nearest", "bf16 stochastic"):
            x = final[name]
            bias = float((x - ref).mean())
            rms = float(((x - ref) / ref).pow(2).mean().sqrt())
            predicted = f"{predicted_rms(beta, float(ref.mean()), spread):.2e}" if name == "bf16 stochastic" else ""
            lines.append(f"| {beta} | {name} | {float(x.mean()):.5f} | {bias:+.2e} | {rms:.2e} | {predicted} |")
    print("\n".join(lines))
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(betas), figsize=(4 * len(betas), 3.2), sharey=True)
        for ax, beta in zip(axes, betas):
            for name, style in (("float32", "-"), ("bf16 nearest", "--"), ("bf16 stochastic", ":")):
                ax.plot(results[beta]["means"][name], style, label=name)
            ax.set_title(f"β = {beta}")
            ax.set_xlabel("step")
            ax.set_xscale("log")
        axes[0].set_ylabel("mean of the stored average")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
