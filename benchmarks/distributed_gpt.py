"""GPT-2 trained with FSDP2 on several GPUs: KOALA++ (fused) against AdamW (fused), tokens/s and peak memory.

On two GPUs (issue 11's target: KOALA++ ≥ 0.95× AdamW's tokens/s, peak memory ≤ AdamW's + 1 %)::

    torchrun --nproc-per-node 2 benchmarks/distributed_gpt.py --model medium --steps 20

On the CPU (gloo), a smoke test with a tiny model::

    torchrun --nproc-per-node 2 benchmarks/distributed_gpt.py --model tiny --device cpu --steps 3

Each rank trains its own slice of every global batch of random tokens (no data is downloaded),
the model's blocks and the root sharded with ``fully_shard``; the optimizers see DTensor shards.
Rank 0 prints one row per optimizer: the median seconds per step after the warm-up over several
rounds (the optimizers alternate, so a slow spell of the machine does not favour one), tokens per
second over all ranks, and the peak memory per rank (CUDA: ``max_memory_allocated`` beyond what was
allocated when the run began, the largest over the ranks and rounds; CPU: the peak resident set size of
the process), and what a run leaves allocated once its model and optimizer are dropped.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kalmanopt  # noqa: E402

#: (layers, heads, width, vocabulary, context) of the models
MODELS = {"medium": (24, 16, 1024, 50257, 1024), "small": (12, 12, 768, 50257, 1024), "tiny": (2, 2, 32, 128, 16)}


class Block(nn.Module):
    """A pre-norm transformer block (GPT-2's)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2 (untied output layer, so every parameter belongs to one module)."""

    def __init__(self, layers: int, heads: int, width: int, vocab: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@dataclass
class Row:
    """One optimizer's figures."""

    optimizer: str
    seconds_per_step: float
    tokens_per_second: float
    peak_memory_gib: float
    final_loss: float
    left_gib: float = 0.0


def _peak_memory(device: torch.device, start: int) -> float:
    """This rank's peak memory in GiB (CUDA: allocated by torch beyond ``start`` bytes, what was allocated
    when the run began; CPU: the process's peak RSS)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - start) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # (kB on Linux)


def _allocated(device: torch.device) -> int:
    """Bytes allocated by torch on ``device`` after a garbage collection (0 on the CPU)."""
    gc.collect()
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _optimizer(name: str, params: list, device: torch.device, args: argparse.Namespace) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=args.lr_adamw, weight_decay=0.1, fused=fused, foreach=not fused)
    return kalmanopt.create("koala++", params, lr=args.lr_koala, sigma=0.1, q=0.1,
                            implementation="fused" if fused else "foreach")


def run_benchmark(args: argparse.Namespace) -> list[Row]:
    """Train each optimizer ``args.rounds`` times for ``args.steps`` timed steps on this rank (the process group
    is initialised); the rows' times are medians over all rounds, their memory the largest peak."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    context = MODELS[args.model][4]
    times: dict[str, list[float]] = {name: [] for name in args.optimizers}
    peaks: dict[str, float] = dict.fromkeys(args.optimizers, 0.0)
    left: dict[str, float] = dict.fromkeys(args.optimizers, 0.0)
    losses_at_end: dict[str, float] = {}
    for round_index in range(args.rounds):  # (alternating order: a slow spell of the machine hits both)
        order = args.optimizers if round_index % 2 == 0 else args.optimizers[::-1]
        for name in order:
            seconds, peak, loss, kept = _train(name, args, device, rank)
            times[name] += seconds
            peaks[name] = max(peaks[name], peak)
            left[name] = max(left[name], kept)
            losses_at_end[name] = loss
    rows = []
    for name in args.optimizers:
        per_step = statistics.median(times[name])
        memory = torch.tensor([peaks[name], left[name]], device=device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        rows.append(Row(name, per_step, args.batch * context * world / per_step, float(memory[0]),
                        losses_at_end[name], float(memory[1])))
    return rows


def _train(name: str, args: argparse.Namespace, device: torch.device,
           rank: int) -> tuple[list[float], float, float, float]:
    """One fresh model and optimizer: the timed steps' seconds, this rank's peak memory, the last loss, and
    the GiB still allocated once the model and the optimizer are dropped (0: nothing outlives the run)."""
    from torch.distributed.fsdp import fully_shard

    layers, heads, width, vocab, context = MODELS[args.model]
    torch.manual_seed(0)
    start = _allocated(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = GPT(layers, heads, width, vocab, context).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = _optimizer(name, list(model.parameters()), device, args)
    generator = torch.Generator().manual_seed(1000 + rank)
    times, loss = [], math.nan
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, vocab, (args.batch, context + 1), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(tokens[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(),
                                 reduction="none").view(args.batch, context).mean(1)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        if name == "adamw":
            opt.step()
        else:
            opt.step(loss=losses.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
        loss = float(losses.detach().mean())
    peak = _peak_memory(device, start)
    del model, opt, logits, losses
    return times, peak, loss, (_allocated(device) - start) / 2 ** 30


def table(rows: list[Row], args: argparse.Namespace, world: int, device: str) -> str:
    """The rows as a Markdown table, with KOALA++'s ratios to AdamW's."""
    memory = "peak GiB / GPU" if device != "cpu" else "peak RSS GiB / rank"
    lines = [f"GPT-2 {args.model}, FSDP2 over {world} ranks ({device}), {args.batch} × {MODELS[args.model][4]} "
             f"tokens per rank and step, median of {args.rounds} × {args.steps} steps "
             f"(each run after {args.warmup} untimed; the optimizers alternate)",
             "", f"| optimizer | s / step | tokens / s | {memory} | left after the run (GiB) | last loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.optimizer} | {r.seconds_per_step:.4f} | {r.tokens_per_second:,.0f} | "
                     f"{r.peak_memory_gib:.3f} | {r.left_gib:.3f} | {r.final_loss:.3f} |")
    by = {r.optimizer: r for r in rows}
    if "adamw" in by and "koala++" in by:
        k, a = by["koala++"], by["adamw"]
        lines.append("")
        lines.append(f"KOALA++ / AdamW: tokens/s {k.tokens_per_second / a.tokens_per_second:.3f}× (target ≥ 0.95), "
                     f"peak memory {k.peak_memory_gib / a.peak_memory_gib:.3f}× (target ≤ 1.01)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="medium")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every optimizer, in alternating order (the median is over all rounds)")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "koala++"], choices=("adamw", "koala++"))
    parser.add_argument("--lr-adamw", type=float, default=3e-4)
    parser.add_argument("--lr-koala", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run under torchrun: every rank trains, rank 0 prints the table."""
    args = parse_args(argv)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        rows = run_benchmark(args)
        if dist.get_rank() == 0:
            print(table(rows, args, dist.get_world_size(), args.device))
        dist.barrier()  # (no rank leaves the group while another still uses it)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
