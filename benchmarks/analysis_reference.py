"""Regenerate docs/analysis.md's figure and its table of every preset against the exact EKF.

    python benchmarks/analysis_reference.py           # prints the Markdown table, writes the figure

A 64-16-10 tanh MLP on scikit-learn's bundled 8×8 digits, 120 minibatches of 32, each supported
preset with sigma = 0.1, q = 0.1 (lr = 1, R the EMA of the loss second moment) beside the exact EKF
(kalmanopt.analysis.compare_with_exact_ekf); the figure is KOALA++'s spectra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kalmanopt.analysis import SUPPORTED_PRESETS, compare_with_exact_ekf, plot_spectra  # noqa: E402

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "analysis_koala_pp_digits.png"


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    return [(X[i], y[i]) for i in torch.randint(0, len(y), (120, 32), generator=gen)]


def run(preset: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    return compare_with_exact_ekf(model, preset, data(),
                                  lambda out, target: F.cross_entropy(out, target, reduction="none"),
                                  record_every=20, sigma=0.1, q=0.1)


def main() -> None:
    layers = ["0.weight", "0.bias", "2.weight", "2.bias"]
    print("| preset | cos 0.weight | cos 0.bias | cos 2.weight | cos 2.bias | rel. error 0.weight | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset in SUPPORTED_PRESETS:
        result = run(preset)
        cos = []
        for layer in layers:
            values = [c for c in result.cosine[layer] if c is not None]
            cos.append(sum(values) / len(values))
        error = result.relative_error["0.weight"][-1]
        print(f"| {preset} | " + " | ".join(f"{c:.3f}" for c in cos)
              + f" | {error:.3f} | {result.losses[0]:.3f} → {result.losses[-1]:.3f} |", flush=True)
        if preset == "koala++":
            plot_spectra(result, FIGURE, layers=["0.weight", "2.weight"])


if __name__ == "__main__":
    main()
