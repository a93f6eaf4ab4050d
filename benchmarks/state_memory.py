"""Bytes of optimizer state per parameter, for every preset, with float32 and with bfloat16 state.

Builds each preset over a small MLP (float32 parameters), takes two steps so that every entry a layer keeps
exists, and counts the bytes of every state tensor (per-parameter vectors, scalars, factors, group tensors)
per parameter. The memory of training beside the model is parameters + gradients + state: 4 + 4 + state
bytes per float32 parameter; AdamW's is 4 + 4 + 8. No GPU needed: the state's layout is the same on every
device and engine.

Usage::

    python benchmarks/state_memory.py            # prints a Markdown table
    python benchmarks/state_memory.py --out state_memory.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kalmanopt  # noqa: E402

WEIGHTS = 8  # bytes per float32 parameter for the parameter and its gradient


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def state_bytes_per_parameter(optimizer: str, state_dtype: str | None, width: int = 512) -> float:
    """The state's bytes per parameter of ``optimizer`` (a preset or ``"AdamW"``) over a 3-layer MLP."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                                torch.nn.GELU(), torch.nn.Linear(width, 10))
    if optimizer == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
    else:
        opt = kalmanopt.create(optimizer, model.parameters(), implementation="foreach", state_dtype=state_dtype)
    x = torch.randn(32, width)
    y = torch.randint(0, 10, (32,))
    for _ in range(2):
        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step() if optimizer == "AdamW" else opt.step(loss=losses)
    n = sum(p.numel() for p in model.parameters())
    total = sum(t.numel() * t.element_size() for t in _tensors(dict(opt.state)))
    return total / n


def table() -> str:
    adam = state_bytes_per_parameter("AdamW", None)
    adam_total = WEIGHTS + adam
    lines = ["Bytes of optimizer state per float32 parameter (a 3-layer MLP of 0.53 M parameters, after two steps), "
             f"and parameters + gradients + state against AdamW's ({adam_total:.2f} bytes). torch {torch.__version__}.",
             "", "| optimizer | state, float32 (B/param) | state, bf16 (B/param) | memory × AdamW, float32 "
             "| memory × AdamW, bf16 |", "|---|---|---|---|---|",
             f"| torch AdamW | {adam:.2f} | | 1.00 | |"]
    for preset in kalmanopt.presets():
        full = state_bytes_per_parameter(preset, None)
        half = state_bytes_per_parameter(preset, "bfloat16")
        lines.append(f"| {preset} | {full:.2f} | {half:.2f} | {(WEIGHTS + full) / adam_total:.2f} | "
                     f"{(WEIGHTS + half) / adam_total:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = table()
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
