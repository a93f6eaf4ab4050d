"""End-to-end training steps at the options people train with: step time, the optimizer's host and device time, warm-up.

A user's loop on a GPT (bf16 autocast, a cosine schedule through ``LambdaLR``, ``zero_grad()`` with torch's
default ``set_to_none=True``), each optimizer given the options of its label, AdamW fused (with the same
weight decay) timed in the same rounds. A label is an optimizer name and ``key=value`` options::

    "AdamW fused wd=0.1"            torch.optim.AdamW(fused=True, weight_decay=0.1)
    "koala++ wd=8e-5 stat=variance" kalmanopt.create("koala++", ..., weight_decay=8e-5, loss_statistic="variance")

Options: ``wd`` (weight decay), ``stat`` (the loss statistic), ``clip`` (``clip_grad_norm_`` to this norm
before the step), ``groups=2`` (two parameter groups, weight decay on the matrices only, as transformers'
Trainer and nanoGPT build them), ``sched=none`` (a constant learning rate), ``lr`` and any other
hyper-parameter of the preset by name.

Per optimizer and round: the training step's wall time (blocks of steps between synchronisations, the
median block), the optimizer step's device time (CUDA events around it in those blocks), its host time
(``time.perf_counter`` around ``step`` in ``--probe-steps`` further steps, each started on an idle device)
and the synchronising calls it makes there, the share of steps replayed from a CUDA graph and the peak
memory. Each Kalman row is compared with the AdamW row of the same clipping, groups and schedule.
``--warmup-processes`` also times the first steps of each optimizer in fresh processes: once with
empty compile caches (Triton's and inductor's, in a temporary directory) and once more with the caches
the first process left::

    python benchmarks/training_options.py --model baby --rounds 3
    python benchmarks/training_options.py --model gpt2-small --rounds 2 --warmup-processes

``--profile`` prints, for each label instead of the table, the host functions under the optimizer's step
(cProfile, 20 steps) and the device's kernels of 5 training steps (``--trace``: their Chrome trace).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import kalmanopt
from kalmanopt.engines import graphs
from kalmanopt.runner.models import GPT

MODELS = {
    # nanoGPT's shakespeare-char model, batch 64 × 256
    "baby": dict(vocab_size=65, block_size=256, d_model=384, n_layer=6, n_head=6, batch=64),
    # GPT-2 small's shape (124 M parameters with the tied head), batch 8 × 1024
    "gpt2-small": dict(vocab_size=50304, block_size=1024, d_model=768, n_layer=12, n_head=12, batch=8),
    # a check of the script on a CPU
    "tiny": dict(vocab_size=65, block_size=32, d_model=64, n_layer=2, n_head=2, batch=8),
}

DEFAULT_LABELS = [
    "AdamW fused wd=0.1",
    "AdamW fused wd=0.1 clip=1.0 groups=2",
    "koala++",
    "koala++ wd=8e-5 stat=variance",
    "koala++ wd=8e-5",
    "koala++ stat=variance",
    "koala++ wd=8e-5 stat=variance clip=1.0 groups=2",
    "koala-adam-steady wd=0.1 stat=variance",
    "koala-adam-steady wd=0.1 clip=1.0 groups=2",
]


@dataclass
class Label:
    """An optimizer and its options, parsed from a label."""

    text: str
    optimizer: str
    hyper: dict[str, Any] = field(default_factory=dict)
    clip: float | None = None
    groups: int = 1
    schedule: bool = True

    @property
    def is_torch(self) -> bool:
        return self.optimizer.startswith("AdamW")


def parse_label(text: str) -> Label:
    """The optimizer and options of a label (see the module's docstring)."""
    words = text.split()
    name = " ".join(w for w in words if "=" not in w)
    label = Label(text, name)
    for word in (w for w in words if "=" in w):
        key, value = word.split("=", 1)
        if key == "wd":
            label.hyper["weight_decay"] = float(value)
        elif key == "stat":
            label.hyper["loss_statistic"] = value
        elif key == "clip":
            label.clip = float(value)
        elif key == "groups":
            if value not in ("1", "2"):
                raise ValueError(f"groups={value}: valid choices 1, 2")
            label.groups = int(value)
        elif key == "sched":
            if value not in ("cosine", "none"):
                raise ValueError(f"sched={value}: valid choices cosine, none")
            label.schedule = value == "cosine"
        else:
            label.hyper[key] = _number(value)
    if name not in ("AdamW fused",) and name not in kalmanopt.presets():
        raise ValueError(f"unknown optimizer {name!r} in label {text!r}: AdamW fused or one of "
                         f"{', '.join(kalmanopt.presets())}")
    return label


def _number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(value, value)


def param_groups(model: torch.nn.Module, label: Label) -> list[dict[str, Any]]:
    """One group, or two (weight decay on the matrices, none on the vectors) for ``groups=2``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if label.groups == 1:
        return [{"params": params}]
    decay = label.hyper.get("weight_decay", 0.0)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, label: Label, steps: int) -> tuple[Any, Any]:
    """The optimizer of a label and its scheduler (cosine with a 10 % warm-up, or constant)."""
    hyper = dict(label.hyper)
    groups = param_groups(model, label)
    if label.groups == 2:
        hyper.pop("weight_decay", None)  # (per group)
    if label.is_torch:
        hyper.setdefault("lr", 3e-3)
        opt = torch.optim.AdamW(groups, fused=True, **hyper)
    else:
        opt = kalmanopt.create(label.optimizer, groups, **hyper)
    warm = max(1, steps // 10)

    def factor(k: int) -> float:
        if not label.schedule:
            return 1.0
        if k < warm:
            return (k + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warm) / max(1, steps - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Loop:
    """A user's training loop for one label: model, data, optimizer, schedule; ``step()`` trains one batch."""

    def __init__(self, model_name: str, label: Label, device: torch.device, steps: int, data: Path | None,
                 seed: int = 0) -> None:
        spec = dict(MODELS[model_name])
        self.batch = spec.pop("batch")
        torch.manual_seed(seed)
        self.model = GPT(**spec, dropout=0.0, bias=False).to(device)
        self.label, self.device = label, device
        self.block = spec["block_size"]
        self.tokens = _tokens(data, spec["vocab_size"], device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.opt, self.scheduler = build_optimizer(self.model, label, steps)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.host_s: list[float] = []
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.replayed = 0
        self.syncs = 0
        self.timing = False  # (the timed blocks: CUDA events around each optimizer step)

    def batch_of(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.tokens.numel() - self.block - 1, (self.batch,), generator=self.generator,
                               device=self.device)
        window = self.tokens[starts[:, None] + torch.arange(self.block + 1, device=self.device)]
        return window[:, :-1], window[:, 1:]

    def step(self, probe: bool = False) -> None:
        """One training step. In the timed blocks CUDA events around the optimizer's step give its device time
        (the host runs ahead of a GPU-bound step, so the span holds the step's kernels only); ``probe``: the
        optimizer's step measured from an idle device (a synchronisation before it): its host time and the
        synchronising calls it makes (``torch.cuda.set_sync_debug_mode``)."""
        x, y = self.batch_of()
        self.opt.zero_grad()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        tokens = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        losses = tokens.view(y.shape).mean(dim=1)  # per sequence
        losses.mean().backward()
        if self.label.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.label.clip)
        if not probe:
            if self.device.type == "cuda" and self.timing:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._optimizer_step(losses)
                end.record()
                self.events.append((start, end))
            else:
                self._optimizer_step(losses)
        else:
            cuda = self.device.type == "cuda"
            sync(self.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                t0 = time.perf_counter()
                self._optimizer_step(losses)
                t1 = time.perf_counter()
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            self.syncs += sum("synchroniz" in str(w.message) for w in caught)
            self.host_s.append(t1 - t0)
        self.scheduler.step()

    def _optimizer_step(self, losses: torch.Tensor) -> None:
        if self.label.is_torch:
            self.opt.step()
        else:
            self.opt.step(loss=losses)


def _tokens(data: Path | None, vocab: int, device: torch.device) -> torch.Tensor:
    """Tiny Shakespeare as character ids (``--data``), or random ids of the model's vocabulary."""
    if data is None:
        return torch.randint(0, vocab, (1_000_000,), generator=torch.Generator().manual_seed(0)).to(device)
    text = data.read_text(encoding="utf-8")
    chars = sorted(set(text))
    if len(chars) > vocab:
        raise ValueError(f"{data} has {len(chars)} distinct characters, more than the model's vocabulary {vocab}")
    ids = {c: i for i, c in enumerate(chars)}
    return torch.tensor([ids[c] for c in text], dtype=torch.long).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counting_replays(loop_of: Callable[[], Loop | None]) -> Callable[[], None]:
    """Count the steps ``graphs.graphed_step`` replayed, into the loop ``loop_of()`` returns; returns the undo."""
    original = graphs.graphed_step

    def counted(opt, loss, statistic):
        replayed = original(opt, loss, statistic)
        loop = loop_of()
        if replayed and loop is not None:
            loop.replayed += 1
        return replayed

    graphs.graphed_step = counted

    def undo() -> None:
        graphs.graphed_step = original

    return undo


def time_label(args, label: Label, device: torch.device, current: list) -> dict:
    """One label's steady training steps: warm ``args.warmup`` steps, then ``args.blocks`` blocks of
    ``args.block_steps`` steps."""
    total = args.warmup + args.blocks * args.block_steps + args.probe_steps
    loop = Loop(args.model, label, device, total, args.data)
    current[0] = None
    for _ in range(args.warmup):
        loop.step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    current[0] = loop
    blocks = []
    loop.timing = True
    for _ in range(args.blocks):
        t0 = time.perf_counter()
        for _ in range(args.block_steps):
            loop.step()
        sync(device)
        blocks.append((time.perf_counter() - t0) / args.block_steps * 1e3)
    replayed = loop.replayed
    loop.timing = False
    for _ in range(args.probe_steps):
        loop.step(probe=True)
    sync(device)
    current[0] = None
    steps = args.blocks * args.block_steps
    device_ms = [a.elapsed_time(b) for a, b in loop.events]
    finite = all(bool(torch.isfinite(p).all()) for p in loop.params)
    row = {"label": label.text, "ms": statistics.median(blocks), "host_ms": statistics.median(loop.host_s) * 1e3,
           "device_ms": statistics.median(device_ms) if device_ms else float("nan"),
           "replayed": replayed / steps, "finite": finite, "syncs": loop.syncs / max(1, args.probe_steps),
           "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")}
    del loop
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def warmup_child(args) -> None:
    """(in a fresh process) the wall time of the first ``args.warmup`` steps of one label, as JSON."""
    device = torch.device(args.device)
    label = parse_label(args.child)
    loop = Loop(args.model, label, device, args.warmup, args.data)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loop.step()
    sync(device)
    print(json.dumps({"label": label.text, "seconds": time.perf_counter() - t0}))


def warmup_processes(args, labels: list[Label]) -> dict[str, tuple[float, float]]:
    """Per label: the first steps' seconds in a process with empty compile caches, then in one with the
    caches the first left."""
    out = {}
    for label in labels:
        with tempfile.TemporaryDirectory() as caches:
            env = {**os.environ, "TRITON_CACHE_DIR": os.path.join(caches, "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
                   "KALMANOPT_CACHE": os.path.join(caches, "kalmanopt")}
            times = []
            for _ in range(2):
                command = [sys.executable, __file__, "--child", label.text, "--model", args.model, "--device",
                           args.device, "--warmup", str(args.warmup)]
                if args.data is not None:
                    command += ["--data", str(args.data)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"warm-up process of {label.text!r} failed:\n{done.stderr[-2000:]}")
                times.append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
            out[label.text] = (times[0], times[1])
            print(f"  warm-up {label.text:48s} cold {times[0]:6.2f} s  cached {times[1]:6.2f} s", flush=True)
    return out


def profile(args, labels: list[Label], device: torch.device) -> None:
    """For each Kalman label: the host functions under 20 steady optimizer steps (cProfile) and, on CUDA, the
    device's kernels in 5 of them (torch.profiler, by total time)."""
    for label in labels:
        loop = Loop(args.model, label, device, args.warmup + 25, args.data)
        for _ in range(args.warmup):
            loop.step()
        sync(device)
        profiler = cProfile.Profile()
        step = loop.opt.step
        loop.opt.step = lambda *a, _step=step, _profiler=profiler, **k: _profiler.runcall(_step, *a, **k)
        for _ in range(20):
            loop.step()
        sync(device)
        loop.opt.step = step
        print(f"\n## {label.text}: cumulative host time of 20 optimizer steps")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        if device.type != "cuda":
            continue
        from torch.profiler import ProfilerActivity, record_function
        from torch.profiler import profile as kernels

        def traced(*a, _step=step, **k):
            with record_function("optimizer step"):
                return _step(*a, **k)

        loop.opt.step = traced
        with kernels(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                loop.step()
            sync(device)
        loop.opt.step = step
        print(f"## {label.text}: the device's work in 5 training steps (the optimizer's under 'optimizer step')")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
        if args.trace is not None:
            path = args.trace.with_name(f"{args.trace.stem}-{len(list(args.trace.parent.glob('*.json')))}.json")
            prof.export_chrome_trace(str(path))
            print(f"trace: {path}")


def table(args, labels: list[Label], device: torch.device) -> str:
    current: list = [None]
    undo = counting_replays(lambda: current[0])
    per: dict[str, list[dict]] = {label.text: [] for label in labels}
    try:
        for r in range(args.rounds):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                row = time_label(args, label, device, current)
                per[label.text].append(row)
                print(f"  round {r + 1} {label.text:48s} {row['ms']:8.3f} ms/step  host {row['host_ms']:.3f}  "
                      f"device {row['device_ms']:.3f}  replayed {row['replayed']:.0%}  finite={row['finite']}",
                      flush=True)
    finally:
        undo()
    warm = warmup_processes(args, labels) if args.warmup_processes else {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    spec = MODELS[args.model]
    lines = [f"Device: **{name}**, torch {torch.__version__}; model `{args.model}` "
             f"({spec['n_layer']} × {spec['d_model']}, batch {spec['batch']} × {spec['block_size']}, bf16 autocast); "
             f"{args.warmup} warm-up steps, then {args.blocks} blocks of {args.block_steps} steps per round, "
             f"{args.rounds} rounds in alternating order: the median of the rounds' median blocks, and their range.",
             ""]
    header = ("| optimizer | step (ms) | × AdamW fused ¹ | rounds' range | opt. host (ms) | host × AdamW ¹ | "
              "opt. device (ms) | replayed | syncs / step | peak (MiB) |")
    if warm:
        header += f" first {args.warmup} steps, cold (s) | cached (s) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    def baseline(label: Label) -> str | None:
        """The AdamW label with the same clipping, groups and schedule (else the first AdamW label)."""
        torch_labels = [other for other in labels if other.is_torch]
        same = [other for other in torch_labels
                if (other.clip, other.groups, other.schedule) == (label.clip, label.groups, label.schedule)]
        chosen = same or torch_labels
        return chosen[0].text if chosen else None

    med = {k: statistics.median(r["ms"] for r in rows) for k, rows in per.items()}
    host = {k: statistics.median(r["host_ms"] for r in rows) for k, rows in per.items()}
    for label in labels:
        rows = per[label.text]
        k = label.text
        dev = statistics.median(r["device_ms"] for r in rows)
        adam = baseline(label)
        ratio = f"{med[k] / med[adam]:.3f}" if adam else ""
        host_ratio = f"{host[k] / host[adam]:.2f}" if adam else ""
        replayed = "" if label.is_torch else f"{statistics.median(r['replayed'] for r in rows):.0%}"
        line = (f"| {k} | {med[k]:.2f} | {ratio} | {min(r['ms'] for r in rows):.2f}–{max(r['ms'] for r in rows):.2f} "
                f"| {host[k]:.3f} | {host_ratio} | {dev:.3f} | {replayed} | {max(r['syncs'] for r in rows):.1f} "
                f"| {max(r['peak_mib'] for r in rows):.0f} |")
        if warm:
            line += f" {warm[k][0]:.1f} | {warm[k][1]:.1f} |"
        lines.append(line)
    lines += ["", "¹ Against the AdamW fused row with the same clipping, parameter groups and schedule."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="baby")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--labels", nargs="+", default=DEFAULT_LABELS)
    parser.add_argument("--warmup", type=int, default=60, help="steps before timing (and the warm-up processes' steps)")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probe-steps", type=int, default=10,
                        help="steps after the timed blocks whose optimizer step is measured alone (host, device)")
    parser.add_argument("--data", type=Path, default=None, help="Tiny Shakespeare (else random tokens)")
    parser.add_argument("--warmup-processes", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--trace", type=Path, default=None,
                        help="with --profile: write each label's device trace (Chrome format) beside this path")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child is not None:
        return warmup_child(args)
    device = torch.device(args.device)
    labels = [parse_label(text) for text in args.labels]
    if args.profile:
        return profile(args, [label for label in labels if not label.is_torch], device)
    result = table(args, labels, device)
    print(result)
    if args.out is not None:
        args.out.write_text(result)


if __name__ == "__main__":
    main()
