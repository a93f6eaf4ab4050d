"""Optimizer step time and state of the structured-covariance presets against AdamW and Muon.

On GPT-2 small's (or medium's) parameter tensors with random gradients, in one process on one device:
``koala-factored``, ``koala-kron`` (its factors refreshed every 10 steps by default) and ``koala-adam-eigen``
(its eigenbasis refreshed every 10 steps), beside ``koala-adam-steady`` (the same filter without a basis),
against torch's AdamW (fused) and torch's Muon (the hidden weight matrices; AdamW fused for the embeddings,
norms and biases, as Muon's documentation prescribes). A step with a refresh interval costs more on its
refresh steps, so each optimizer is timed as the mean over a whole number of intervals (CUDA events around the
block of steps), in rounds whose order alternates. Reported beside the times: the optimizer state (the bytes a
state dict holds: AdamW's two moments, Muon's momentum, the factors), the workspace a step keeps besides, and
the peak memory the optimizer adds beyond parameters and gradients.

Usage::

    python benchmarks/structured_step.py --device cuda --sets "GPT-2 small" --rounds 3 --out structured.md
    python benchmarks/structured_step.py --device cpu --sets tiny      # a smoke run on the CPU

It writes a Markdown table (and prints it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import gpt2_shapes, make_params, sync  # noqa: E402

import kalmanopt  # noqa: E402

PARAMETER_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "GPT-2 small": lambda: gpt2_shapes(12, 768),
    "GPT-2 medium": lambda: gpt2_shapes(24, 1024),
    "tiny": lambda: gpt2_shapes(2, 64, vocab=256, context=64),
}


def _hidden_matrices(params: list[torch.nn.Parameter], shapes: list[tuple[int, ...]]) -> list[bool]:
    """Which tensors Muon takes: 2-D, and not the token or position embedding (the first two of GPT-2's)."""
    return [len(s) == 2 and i >= 2 for i, s in enumerate(shapes)]


class MuonWithAdamW:
    """torch's Muon on the hidden matrices and AdamW (fused) on the rest, stepped together."""

    def __init__(self, params: list[torch.nn.Parameter], shapes: list[tuple[int, ...]], lr: float = 4e-3,
                 adamw_lr: float = 1e-3, weight_decay: float = 0.1) -> None:
        hidden = _hidden_matrices(params, shapes)
        self.muon = torch.optim.Muon([p for p, h in zip(params, hidden) if h], lr=lr, weight_decay=weight_decay,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW([p for p, h in zip(params, hidden) if not h], lr=adamw_lr,
                                       weight_decay=weight_decay, fused=params[0].is_cuda)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict_bytes(self) -> int:
        return _state_bytes(self.muon) + _state_bytes(self.adamw)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """The bytes of the tensors in ``opt.state_dict()["state"]`` (what a checkpoint holds), step counters aside."""
    total = 0
    for entry in opt.state_dict()["state"].values():
        for value in entry.values() if isinstance(entry, dict) else ():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def _workspace_bytes(opt: torch.optim.Optimizer) -> int:
    if not isinstance(opt, kalmanopt.KalmanOptimizer):
        return 0
    names = set(kalmanopt.plan.state_table(opt.filter).workspace_keys)
    return sum(t.numel() * t.element_size() for entry in opt.state.values() if isinstance(entry, dict)
               for k, t in entry.items() if k in names and isinstance(t, torch.Tensor))


def build(label: str, params: list[torch.nn.Parameter], shapes: list[tuple[int, ...]]) -> tuple[object, Callable]:
    """The optimizer ``label`` over ``params`` and its step function."""
    if label == "AdamW fused":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=params[0].is_cuda)
        return opt, opt.step
    if label == "Muon + AdamW":
        muon = MuonWithAdamW(params, shapes)
        return muon, muon.step
    preset, options = label_options(label)
    keywords = {"implementation": "fused" if params[0].is_cuda else "foreach", "weight_decay": 1e-4, "r": 1.0,
                "lr": 1e-3}
    if "refresh" in options:
        keywords["refresh"] = int(options["refresh"])
    opt = kalmanopt.create(preset, params, **keywords)  # (matmul=<precision> is set around the timing: time_one)
    loss = torch.tensor(1.0, device=params[0].device)
    return opt, lambda: opt.step(loss=loss)


def label_options(label: str) -> tuple[str, dict[str, str]]:
    """A preset's label split into the preset and its options: ``refresh=<k>`` (the factor refresh) and
    ``matmul=<highest|high|medium>`` (the float32 matmul precision it is timed at; torch's default
    ``highest`` is true float32, ``high`` TF32 tensor cores)."""
    preset, *words = label.split(" ")
    options = dict(word.partition("=")[::2] for word in words)
    unknown = sorted(set(options) - {"refresh", "matmul"})
    if unknown:
        raise SystemExit(f"unknown option {unknown[0]!r} in {label!r}: refresh=<k> or matmul=<highest|high|medium>")
    return preset, options


def time_one(label: str, shapes: list[tuple[int, ...]], device: torch.device, warmup: int, steps: int) -> dict:
    before = torch.get_float32_matmul_precision()
    fixed = label in ("AdamW fused", "Muon + AdamW")
    torch.set_float32_matmul_precision("highest" if fixed else label_options(label)[1].get("matmul", "highest"))
    try:
        return _time_one(label, shapes, device, warmup, steps)
    finally:
        torch.set_float32_matmul_precision(before)


def _time_one(label: str, shapes: list[tuple[int, ...]], device: torch.device, warmup: int, steps: int) -> dict:
    params = make_params(shapes, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    opt, step = build(label, params, shapes)
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        host = (time.perf_counter() - t0) * 1e3 / steps
        end.record()
        sync(device)
        ms = start.elapsed_time(end) / steps
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ms = host = (time.perf_counter() - t0) * 1e3 / steps
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if device.type == "cuda" else float("nan")
    state = opt.state_dict_bytes() if isinstance(opt, MuonWithAdamW) else _state_bytes(opt)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    return {"ms": ms, "host_ms": host, "peak_mib": peak, "state_mib": state / 2 ** 20,
            "workspace_mib": _workspace_bytes(opt) / 2 ** 20,
            "finite": finite}


def matmul_gflop(label: str, shapes: list[tuple[int, ...]]) -> float:
    """The matrix products a step of ``koala-kron`` or ``koala-adam-eigen`` makes, in GFLOP, amortised over its
    refresh (0 for the others).

    Per layer read as m × n, with the factors' forms from the preset's own state table (a dense row factor is
    m × m, a dense column factor n × n):

    - ``koala-kron``: D = Â H B̂ costs 2m²n (A dense) + 2mn² (B dense) every step, and the posterior's two
      sandwiches D B̂ Dᵀ and Dᵀ A⁺ D twice that at each refresh;
    - ``koala-adam-eigen``: per dense side (rows: 2m²n each) the rotation in, the rotation out and the noise
      factor's H Hᵀ every step, and at each refresh O = U′ᵀ U (2m³) and the carry of m̃ and ṽ (2m²n each); the
      eigendecompositions are not counted.

    Their time at a card's matmul rate is the floor of the step's matrix work."""
    if label in ("AdamW fused", "Muon + AdamW"):
        return 0.0
    preset, options = label_options(label)
    if preset not in ("koala-kron", "koala-adam-eigen"):
        return 0.0
    refresh = int(options.get("refresh", 1 if preset == "koala-kron" else 10))
    probe = kalmanopt.create(preset, [torch.nn.Parameter(torch.zeros(1))])  # (its filter's state table)
    table, hp = kalmanopt.plan.state_table(probe.filter), probe.param_groups[0]
    rows, cols = ("A", "B") if preset == "koala-kron" else ("noise_rows", "noise_cols")
    total = 0.0
    for shape in shapes:
        m, n, matrix = kalmanopt.state.matricised_shape(tuple(shape))
        factors = table.factor_shapes(tuple(shape), hp)
        dense_rows, dense_cols = len(factors[rows]) == 2, len(factors[cols]) == 2
        if preset == "koala-kron":
            predict = (2.0 * m * m * n if dense_rows else 0.0) + (2.0 * m * n * n if dense_cols else 0.0)
            total += predict * (1.0 + 2.0 / refresh)
            continue
        for dense, side, other in ((dense_rows, m, n), (dense_cols, n, m)):
            if dense:
                total += 3 * 2.0 * side * side * other + (2.0 * side ** 3 + 2 * 2.0 * side * side * other) / refresh
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sets", nargs="+", default=["GPT-2 small"], choices=list(PARAMETER_SETS))
    parser.add_argument("--optimizers", nargs="+",
                        default=["AdamW fused", "Muon + AdamW", "koala-factored", "koala-kron refresh=10",
                                 "koala-kron refresh=10 matmul=high", "koala-kron refresh=1"],
                        help="labels: 'AdamW fused', 'Muon + AdamW', or a preset with options 'refresh=<k>' (the "
                             "factor refresh) and 'matmul=<highest|high|medium>' (the float32 matmul precision)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40, help="steps timed per round (a multiple of the refresh)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"Device: **{name}**, torch {torch.__version__}. Mean ms per optimizer step over {args.steps} steps "
             f"after {args.warmup} warm-up steps; the median of {args.rounds} rounds (order alternating) and their "
             "range. 'host': the time the host takes to issue a step (the median of the rounds; a step whose host "
             "time is its step time is bound by the host); 'matmul=high': the step timed under "
             "torch.set_float32_matmul_precision('high') (TF32 matmuls), the others at torch's default ('highest'). "
             "'matmul GFLOP': the matrix products of a step (amortised over the refresh; see matmul_gflop). "
             "'state': the tensors a state dict holds; 'workspace': buffers a step keeps besides (never saved); "
             "'peak': the memory the optimizer adds beyond parameters and gradients.", "",
             "| parameter set | optimizer | step (ms) | × AdamW fused | rounds' range (ms) | host (ms) | matmul GFLOP "
             "| state (MiB) | state × AdamW's | workspace (MiB) | peak (MiB) | finite |",
             "|" + "---|" * 12]
    for set_name in args.sets:
        shapes = PARAMETER_SETS[set_name]()
        rows: dict[str, list[dict]] = {label: [] for label in args.optimizers}
        for r in range(args.rounds):
            order = args.optimizers if r % 2 == 0 else list(reversed(args.optimizers))
            for label in order:
                rows[label].append(time_one(label, shapes, device, args.warmup, args.steps))
                print(f"{set_name} round {r + 1}: {label} {rows[label][-1]['ms']:.3f} ms", file=sys.stderr)
        adam = statistics.median(x["ms"] for x in rows["AdamW fused"]) if "AdamW fused" in rows else float("nan")
        adam_state = rows["AdamW fused"][0]["state_mib"] if "AdamW fused" in rows else float("nan")
        for label, runs in rows.items():
            ms = statistics.median(x["ms"] for x in runs)
            first = runs[0]
            lines.append(f"| {set_name} | {label} | {ms:.3f} | {ms / adam:.2f} | "
                         f"{min(x['ms'] for x in runs):.3f}–{max(x['ms'] for x in runs):.3f} | "
                         f"{statistics.median(x['host_ms'] for x in runs):.3f} | "
                         f"{matmul_gflop(label, shapes):.1f} | "
                         f"{first['state_mib']:.1f} | {first['state_mib'] / adam_state:.3f} | "
                         f"{first['workspace_mib']:.1f} | {max(x['peak_mib'] for x in runs):.0f} | "
                         f"{all(x['finite'] for x in runs)} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
