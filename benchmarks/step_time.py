"""Optimizer step time of the kalmanopt presets against torch's AdamW and SGD, and training steps.

Everything is measured in one process on one device, so the ratios compare like with like:

- the optimizer step alone, on the parameter sets of ResNet-50 (25.6 M, 161 tensors), GPT-2
  small (124 M, 148) and GPT-2 medium (355 M, 292), with random gradients: median step time
  over CUDA events, the bandwidth floor (7 fp32 accesses per parameter, as AdamW; 11 for a
  plain two-pass step) over the measured device-to-device copy bandwidth, and the peak memory
  the optimizer adds beyond parameters and gradients;
- the end-to-end training step (forward, backward, optimizer) of a small GPT (10.7 M) and of a
  ResNet-50, with AdamW (fused) and KOALA++ (fused);
- on the CPU: the step on a 5.8 M-parameter MLP (14 tensors) against torch's AdamW.

Usage::

    python benchmarks/step_time.py --device cuda --out benchmarks.md
    python benchmarks/step_time.py --device cuda --sets ResNet-50 --rounds 3   # host-bound: rounds
    python benchmarks/step_time.py --device cpu --threads 2 --out cpu.md
    python benchmarks/step_time.py --device cuda --sets "GPT-2 small" "GPT-2 medium" --presets koala++ \
        koala-adam-steady --implementations fused --bf16-state --rounds 3    # bfloat16 state

``--rounds N`` times every optimizer N times, the order reversed in every other round, and reports the
median of the rounds' medians with their range: a host-bound step moves between rounds by more than
the ratios it is read for.

It writes a Markdown table (and prints it).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kalmanopt  # noqa: E402

FP32 = 4


# ---------------------------------------------------------------------------- parameter sets
def gpt2_shapes(n_layer: int, d: int, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2's parameter tensors (as in the Hugging Face layout, tied output embedding)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's parameter tensors: convolutions, batch-norm scales and shifts, the classifier."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


def mlp_shapes() -> list[tuple[int, ...]]:
    """A 5.8 M-parameter MLP: 7 linear layers, 14 tensors."""
    sizes = [784, 1000, 1000, 1000, 1000, 1000, 1000, 10]
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        shapes += [(b, a), (b,)]
    return shapes


PARAMETER_SETS = {
    "ResNet-50": resnet50_shapes,
    "GPT-2 small": lambda: gpt2_shapes(12, 768),
    "GPT-2 medium": lambda: gpt2_shapes(24, 1024),
}


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Per-step times in milliseconds (CUDA events on the GPU, the host clock on the CPU)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            step()
            end.record()
        sync(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    times = time_steps(lambda: b.copy_(a), device, 3, 20)
    return 2 * n * FP32 / (statistics.median(times) / 1e3)


def make_params(shapes, device, seed=0) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(s, device=device, generator=gen) * 1e-3
        params.append(p)
    return params


def optimizer_step_time(name: str, build: Callable, shapes, device, warmup: int, repeats: int) -> dict:
    params = make_params(shapes, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    opt, step = build(params)
    times = time_steps(step, device, warmup, repeats)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    del opt, params
    return {"name": name, "ms": statistics.median(times), "peak_mib": peak, "finite": finite}


def kalman_builder(preset: str, implementation: str, **kw) -> Callable:
    def build(params):
        opt = kalmanopt.create(preset, params, implementation=implementation, **kw)
        losses = torch.rand(64, device=params[0].device) + 0.5
        return opt, lambda: opt.step(loss=losses)
    return build


def eager_coefficients_builder(build: Callable) -> Callable:
    """``build``'s optimizer with the coefficient functions run op by op (not compiled)."""
    from kalmanopt.engines import compiled

    def build_eager(params):
        opt, step = build(params)

        def eager_step():
            compiled.CONFIG["enabled"] = False
            try:
                step()
            finally:
                compiled.CONFIG["enabled"] = True
        return opt, eager_step
    return build_eager


def two_phase_builder(preset: str, implementation: str, **kw) -> Callable:
    """The authors' loop: predict(), then update(mean, statistic)."""
    def build(params):
        opt = kalmanopt.create(preset, params, implementation=implementation, **kw)
        losses = torch.rand(64, device=params[0].device) + 0.5
        mean, statistic = losses.mean(), (losses * losses).mean()

        def step():
            opt.predict()
            opt.update(mean, statistic)
        return opt, step
    return build


class OutsideProduct(kalmanopt.ProductSurrogate):
    """An unchanged subclass of the product surrogate, defined outside the package."""


class OutsideDiagonal(kalmanopt.DiagonalSurrogate):
    """A part with a coefficient formula of its own, defined outside the package: the diagonal surrogate
    whose innovation variance is inflated by a factor (1 + c), S = (1 + c)(Σ p̂ H²) + R."""

    def coefficients(self, b) -> None:
        super().coefficients(b)
        inflated = 1.25 * (b.S - b.R) + b.R
        b.S = inflated
        b.coef["S"] = inflated
        b.gain = [1.0 / inflated]


def outside_builder(surrogate: kalmanopt.CovarianceSurrogate, implementation: str) -> Callable:
    """A composition of a part defined outside the package (see the classes above)."""
    def build(params):
        composition = kalmanopt.Composition(kalmanopt.LossMeasurement(), kalmanopt.RandomWalk(), surrogate,
                                            name=type(surrogate).__name__)
        opt = kalmanopt.KalmanOptimizer(params, composition, implementation=implementation)
        losses = torch.rand(64, device=params[0].device) + 0.5
        return opt, lambda: opt.step(loss=losses)
    return build


def graph_builder(build: Callable) -> Callable:
    """The same step captured in a CUDA graph (warm-up on a side stream, then replays): no host cost."""
    def build_graph(params):
        opt, step = build(params)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return (opt, graph), graph.replay
    return build_graph


def torch_builder(cls, **kw) -> Callable:
    def build(params):
        opt = cls(params, **kw)
        return opt, opt.step
    return build


# ---------------------------------------------------------------------------- training steps
class SmallGPT(torch.nn.Module):
    """A character-level GPT (6 layers, 6 heads, 384 wide, context 256): 10.7 M parameters."""

    def __init__(self, vocab=65, d=384, n_layer=6, n_head=6, context=256):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(context, d)
        layer = torch.nn.TransformerEncoderLayer(d, n_head, 4 * d, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def training_step_time(model_name: str, optimizer: str, device, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    if model_name == "small GPT":
        model = SmallGPT().to(device)
        x = torch.randint(0, 65, (64, 256), device=device)
        y = torch.randint(0, 65, (64, 256), device=device)

        def losses_of():
            return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
    else:
        import torchvision

        model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
        x = torch.randn(64, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (64,), device=device)

        def losses_of():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            return torch.nn.functional.cross_entropy(out.float(), y, reduction="none")
    n_params = sum(p.numel() for p in model.parameters())
    if optimizer == "AdamW fused":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

        def step():
            opt.zero_grad(set_to_none=False)
            losses_of().mean().backward()
            opt.step()
    else:
        opt = kalmanopt.create(optimizer.removesuffix(" fused"), model.parameters(), implementation="fused")

        def step():
            opt.zero_grad(set_to_none=False)
            losses = losses_of()
            losses.mean().backward()
            opt.step(loss=losses)
    times = time_steps(step, device, warmup, repeats)
    return {"model": model_name, "params": n_params, "optimizer": optimizer, "ms": statistics.median(times)}


# ---------------------------------------------------------------------------- main
def in_rounds(labels: list[str], time_one: Callable[[str], dict], rounds: int, tag: str) -> dict[str, list[dict]]:
    """Each label's timing (``time_one(label)``, a dict with ``ms``) in every round, the order reversed in every
    other round: a host-bound step moves between rounds, and the rounds' median and range show it. A label
    whose timing fails is reported and left out of that round."""
    per_round: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            try:
                row = time_one(label)
            except Exception as error:  # report and go on with the others
                print(f"  {tag:13s} {label:28s} failed: {error!r}", flush=True)
                continue
            per_round[label].append(row)
            torch.cuda.empty_cache()
            extra = f"  peak {row['peak_mib']:8.1f} MiB  finite={row['finite']}" if "peak_mib" in row else ""
            print(f"  {tag:13s} {label:28s} round {r + 1}: {row['ms']:8.3f} ms{extra}", flush=True)
    return per_round


def gpu_tables(args) -> str:
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device)
    lines = [f"Device: **{name}**, torch {torch.__version__}; device-to-device copy bandwidth "
             f"{bw / 1e12:.2f} TB/s (bytes read + written). Median of {args.repeats} steps after "
             f"{args.warmup} warm-up steps, in one process. Floors: 7 (and 11) fp32 accesses per parameter "
             "over that bandwidth. 'peak' is the memory the optimizer adds beyond parameters and gradients; "
             "'× AdamW memory' is parameters, gradients and that peak against AdamW fused's.", ""]
    candidates = [
        ("AdamW foreach", torch_builder(torch.optim.AdamW, lr=1e-3, foreach=True)),
        ("AdamW fused", torch_builder(torch.optim.AdamW, lr=1e-3, fused=True)),
        ("SGD momentum foreach", torch_builder(torch.optim.SGD, lr=1e-3, momentum=0.9, foreach=True)),
    ]
    for preset in args.presets:
        for impl in args.implementations:
            candidates.append((f"{preset} {impl}", kalman_builder(preset, impl)))
            if args.bf16_state:
                candidates.append((f"{preset} {impl}, bf16 state",
                                   kalman_builder(preset, impl, state_dtype="bfloat16")))
    if "koala++" in args.presets and "fused" in args.implementations:
        candidates.append(("koala++ fused, wd=1e-4", kalman_builder("koala++", "fused", weight_decay=1e-4)))
        candidates.append(("koala++ fused, coefficients eager",
                           eager_coefficients_builder(kalman_builder("koala++", "fused"))))
        candidates.append(("AdamW fused, CUDA graph",
                           graph_builder(torch_builder(torch.optim.AdamW, lr=1e-3, fused=True, capturable=True))))
        candidates.append(("koala++ fused, CUDA graph", graph_builder(kalman_builder("koala++", "fused"))))
        candidates.append(("subclass of ProductSurrogate, fused", outside_builder(OutsideProduct(), "fused")))
    if "koala-diag" in args.presets and "fused" in args.implementations:
        candidates.append(("outside part (own S formula), fused", outside_builder(OutsideDiagonal(), "fused")))
    rounds = max(1, args.rounds)
    if rounds > 1:
        lines += [f"Each optimizer timed in {rounds} rounds, the order reversed in every other round (a fresh "
                  "optimizer each time): the median of the rounds' medians, and the rounds' range.", ""]
    header = "| parameter set | tensors | params (M) | optimizer | step (ms) | × AdamW fused | % of 7-access floor " \
             "| % of 11-access floor | peak (MiB) | × AdamW memory | rounds' range (ms) |"
    lines += [header, "|" + "---|" * 11]
    for set_name in args.sets:
        shapes = PARAMETER_SETS[set_name]()
        n = sum(math.prod(s) for s in shapes)
        floor7 = 7 * FP32 * n / bw * 1e3
        floor11 = 11 * FP32 * n / bw * 1e3
        timed = [(label, build) for label, build in candidates
                 if not ("foreach" in label and "koala" in label and set_name != "ResNet-50" and not args.slow_foreach)]
        builds = dict(timed)
        per_round = in_rounds(list(builds), lambda label, builds=builds, shapes=shapes: optimizer_step_time(
            label, builds[label], shapes, device, args.warmup, args.repeats), rounds, set_name)
        ms = {label: statistics.median(x["ms"] for x in rows) for label, rows in per_round.items() if rows}
        adam = ms["AdamW fused"]
        weights = 2 * FP32 * n / 2**20  # (parameters and gradients, MiB)
        adam_total = weights + max(x["peak_mib"] for x in per_round["AdamW fused"])
        for label, rows in per_round.items():
            if not rows:
                continue
            t = ms[label]
            peak = max(x["peak_mib"] for x in rows)
            spread = f"{min(x['ms'] for x in rows):.3f}–{max(x['ms'] for x in rows):.3f}" if rounds > 1 else ""
            lines.append(f"| {set_name} | {len(shapes)} | {n / 1e6:.1f} | {label} | {t:.3f} | {t / adam:.2f} | "
                         f"{100 * floor7 / t:.0f} % | {100 * floor11 / t:.0f} % | "
                         f"{peak:.0f} | {(weights + peak) / adam_total:.2f} | {spread} |")
        lines.append(f"| {set_name} | | | floor: 7 accesses / 11 accesses | {floor7:.3f} / {floor11:.3f} | | | | | | |")
    if args.training:
        lines += ["", "End-to-end training step (forward, backward, optimizer; small GPT in fp32 with batch "
                  "64 × 256 tokens, ResNet-50 in bf16 autocast with batch 64 at 224²)"
                  + (f"; median over {rounds} rounds, the optimizers' order alternating, of each round's "
                     "median, and the rounds' range" if rounds > 1 else "") + ":", "",
                  "| model | params (M) | optimizer | step (ms) | × AdamW fused | rounds' range (ms) |",
                  "|---|---|---|---|---|---|"]
        optimizers = ("AdamW fused",) + tuple(f"{preset} fused" for preset in args.training_presets)
        for model_name in ("small GPT", "ResNet-50"):
            rows = in_rounds(list(optimizers), lambda o, model_name=model_name: training_step_time(
                model_name, o, device, args.warmup, args.repeats), rounds, model_name)
            times = {o: [x["ms"] for x in rows[o]] for o in optimizers}
            n_params = rows[optimizers[0]][0]["params"]
            adam = statistics.median(times[optimizers[0]])
            for o in optimizers:
                ms = statistics.median(times[o])
                lines.append(f"| {model_name} | {n_params / 1e6:.1f} | {o} | {ms:.2f} | {ms / adam:.3f} | "
                             f"{min(times[o]):.2f}–{max(times[o]):.2f} |")
    return "\n".join(lines) + "\n"


def cpu_table(args) -> str:
    """CPU step times, the optimizers interleaved step by step (so a busy machine slows them alike), in
    ``args.rounds`` rounds (the order reversed in every other round): the median of the rounds' medians, and
    their range. Ratios are to torch's AdamW (foreach) with the same weight decay as the row (none or 5e-4)."""
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    shapes = mlp_shapes()
    n = sum(math.prod(s) for s in shapes)
    rounds = max(1, args.rounds)
    lines = [f"CPU: {args.threads} threads, torch {torch.__version__}; MLP of {n / 1e6:.2f} M parameters in "
             f"{len(shapes)} tensors; median of {args.repeats} steps in each of {rounds} round(s), the optimizers "
             "interleaved step by step.", "",
             "| optimizer | step (ms) | range over rounds | × torch AdamW foreach, same weight decay |",
             "|---|---|---|---|"]
    plain, decayed = "torch AdamW foreach", "torch AdamW foreach, wd 5e-4"
    candidates = [("torch AdamW (default)", torch_builder(torch.optim.AdamW, lr=1e-3)),
                  (plain, torch_builder(torch.optim.AdamW, lr=1e-3, foreach=True)),
                  (decayed, torch_builder(torch.optim.AdamW, lr=1e-3, foreach=True, weight_decay=5e-4)),
                  ("torch SGD momentum", torch_builder(torch.optim.SGD, lr=1e-3, momentum=0.9))]
    if not args.decay_only:
        for preset in args.presets:
            for impl in ("foreach", "reference"):
                candidates.append((f"{preset} {impl}", kalman_builder(preset, impl)))
    for preset in args.presets:  # the setting: weight decay 5e-4, both ways of driving the optimizer
        candidates.append((f"{preset} foreach, wd 5e-4, step(loss=)", kalman_builder(preset, "foreach",
                                                                                    weight_decay=5e-4)))
        candidates.append((f"{preset} foreach, wd 5e-4, predict/update", two_phase_builder(preset, "foreach",
                                                                                         weight_decay=5e-4)))
        if args.bf16_state:
            candidates.append((f"{preset} foreach, wd 5e-4, step(loss=), bf16 state", kalman_builder(
                preset, "foreach", weight_decay=5e-4, state_dtype="bfloat16")))
    steps = []
    for label, build in candidates:
        params = make_params(shapes, device)
        _, step = build(params)
        for _ in range(args.warmup):
            step()
        steps.append((label, step, params))
    medians: dict[str, list[float]] = {label: [] for label, _, _ in steps}
    for r in range(rounds):
        times: dict[str, list[float]] = {label: [] for label, _, _ in steps}
        order = steps if r % 2 == 0 else steps[::-1]
        for _ in range(args.repeats):
            for label, step, _ in order:
                t0 = time.perf_counter()
                step()
                times[label].append((time.perf_counter() - t0) * 1e3)
        for label, values in times.items():
            medians[label].append(statistics.median(values))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    for label, _, params in steps:
        ms = statistics.median(medians[label])
        base = statistics.median(medians[decayed if "wd" in label else plain])
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        print(f"  {label:44s} {ms:8.2f} ms  finite={finite}", flush=True)
        lines.append(f"| {label} | {ms:.2f} | {min(medians[label]):.2f}–{max(medians[label]):.2f} | "
                     f"{ms / base:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sets", nargs="*", default=list(PARAMETER_SETS))
    parser.add_argument("--presets", nargs="*", default=["koala++", "koala-v", "koala-m", "koala-diag"])
    parser.add_argument("--implementations", nargs="*", default=["fused", "foreach"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--training", action="store_true", help="also time end-to-end training steps")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each optimizer this many times (optimizer steps and training steps), the "
                             "order reversed in every other round")
    parser.add_argument("--training-presets", nargs="+", default=["koala++"],
                        help="training steps: the presets timed against AdamW fused (on the fused engine)")
    parser.add_argument("--slow-foreach", action="store_true", help="time the foreach paths on the GPT-2 sets too")
    parser.add_argument("--bf16-state", action="store_true",
                        help="also time each Kalman row with state_dtype='bfloat16' (vectors stored in bf16)")
    parser.add_argument("--decay-only", action="store_true",
                        help="on the CPU: only the rows with weight decay (and the torch baselines)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    table = gpu_tables(args) if args.device == "cuda" else cpu_table(args)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
