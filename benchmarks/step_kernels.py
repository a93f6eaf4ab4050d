"""Count the device operations a captured step of the fused engine holds, outside its generated kernels.

A replayed step (:mod:`kalmanopt.engines.graphs`) launches one CUDA graph; CUDA's launch of it costs host time
per kernel node (about 2.3 µs each on an H100 host, ``docs/benchmarks.md``), so the small operations of the
step's bookkeeping (the step's code, masks, counters, the coefficient tables) cost host time at every step
while their device time is negligible. This script runs the region a graph captures (the update with the
next predict riding on it, ``run_update`` then ``run_predict``) under a ``TorchDispatchMode`` and counts the
operations that launch device work: views, empty results and host scalars are not counted, the parts'
coefficient functions are counted apart (on CUDA ``torch.compile`` fuses them into a few kernels) and the
generated Triton kernels are not torch operations. With ``TRITON_INTERPRET=1`` it runs on the CPU (the same
Python issues the same operations); on a GPU, pass ``--device cuda``.

    TRITON_INTERPRET=1 python benchmarks/step_kernels.py
    TRITON_INTERPRET=1 python benchmarks/step_kernels.py --presets koala++ koala-adam-steady --by-site
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kalmanopt  # noqa: E402
from kalmanopt.contract import CODE_SKIPS  # noqa: E402
from kalmanopt.engines import driver, graphs  # noqa: E402

#: (label, preset, options, groups): the options of benchmarks/training_options.py's rows
ROWS = [("koala++", "koala++", {}, 1),
        ("koala++ wd=8e-5 stat=variance", "koala++", {"weight_decay": 8e-5, "loss_statistic": "variance"}, 1),
        ("koala++ wd=8e-5 stat=variance groups=2", "koala++", {"weight_decay": 8e-5, "loss_statistic": "variance"},
         2),
        ("koala-adam-steady wd=0.1 stat=variance", "koala-adam-steady",
         {"weight_decay": 0.1, "loss_statistic": "variance"}, 1),
        ("koala-adam-steady wd=0.1 groups=2", "koala-adam-steady", {"weight_decay": 0.1}, 2)]
_SITES = ("/kalmanopt/",)
#: operations that launch nothing on the device: allocations, host scalars, the profiler's markers
_FREE = ("empty", "new_empty", "lift_fresh", "scalar_tensor", "_local_scalar_dense", "_record_function")


class _Count(TorchDispatchMode):
    """Operations that launch device work, by where in kalmanopt they were issued."""

    def __init__(self) -> None:
        super().__init__()
        self.outside: collections.Counter = collections.Counter()
        self.coefficients = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(_FREE) or not self._launches(func, args, kwargs, out):
            return out
        stack = traceback.extract_stack()[:-1]
        if any("/triton/" in f.filename for f in stack):
            return out  # (the interpreter's own copies around a generated kernel)
        if any(f.filename.endswith("plan.py") and "coefficients" in f.name for f in stack):
            self.coefficients += 1
            return out
        site = next((f for f in reversed(stack) if any(s in f.filename for s in _SITES)), stack[-1])
        self.outside[f"{Path(site.filename).name}:{site.name}"] += 1
        return out

    @staticmethod
    def _launches(func, args, kwargs, out) -> bool:  # noqa: ANN001 - torch's protocol
        """Whether the operation writes device memory: a non-empty result on the device (every tensor, with
        the interpreter) that is not a view of one of its inputs, or an in-place operation."""
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.numel()
                   and (interpreting or t.device.type != "cpu")]
        if not results:
            return False
        if func._schema.is_mutable:
            return True
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.numel()}
        return not all(t.untyped_storage().data_ptr() in inputs for t in results)


def _optimizer(preset: str, options: dict, groups: int, device: torch.device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(3) for m in (torch.nn.Linear(24, 24), torch.nn.LayerNorm(24))],
                                torch.nn.Linear(24, 4)).to(device)
    params = list(model.parameters())
    pg: list = params
    if groups == 2:  # (weight decay on the matrices only)
        decay = options.pop("weight_decay", 0.0)
        pg = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return model, kalmanopt.create(preset, pg, implementation="fused", **options)


def count(preset: str, options: dict, groups: int, device: torch.device) -> _Count:
    """The operations of one captured-step region, after three steps (the plans steady)."""
    model, opt = _optimizer(preset, dict(options), groups, device)
    x = torch.randn(16, 24, device=device)

    def backward() -> torch.Tensor:
        opt.zero_grad()
        losses = model(x).pow(2).mean(1)
        losses.mean().backward()
        return losses

    for _ in range(3):
        opt.step(loss=backward())
    mean, statistic = opt._split_step_loss(backward())
    graphs._token(opt)  # (what a replay checks first, outside the graph: the moved gradients' offsets)
    with _Count() as counted:
        code = driver.run_update(opt, mean, statistic, ride_predict=True)
        driver.run_predict(opt, (code & CODE_SKIPS) == 0, ridden=True)
    return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--labels", nargs="*", default=None, help="rows to run (default: all)")
    parser.add_argument("--by-site", action="store_true", help="also list the operations by function")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on the CPU the fused engine runs in Triton's interpreter: set TRITON_INTERPRET=1")
    known = [r[0] for r in ROWS]
    for label in args.labels or ():
        if label not in known:
            parser.error(f"unknown row {label!r}; valid choices: " + ", ".join(map(repr, known)))
    rows = [r for r in ROWS if args.labels is None or r[0] in args.labels]
    print("| optimizer | bookkeeping operations | coefficient-function operations (compiled on CUDA) |")
    print("|---|---|---|")
    sites = {}
    for label, preset, options, groups in rows:
        counted = count(preset, options, groups, device)
        sites[label] = counted.outside
        print(f"| {label} | {sum(counted.outside.values())} | {counted.coefficients} |", flush=True)
    if args.by_site:
        for label, where in sites.items():
            print(f"\n{label}:")
            for site, n in sorted(where.items(), key=lambda kv: -kv[1]):
                print(f"  {n:3d}  {site}")


if __name__ == "__main__":
    main()
