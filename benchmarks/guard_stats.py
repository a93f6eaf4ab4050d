"""How often the positive-definiteness guard fires, and how often the angle between H_k and v_k passes 90°.

The product surrogates (koala++, koala++-ns, koala++-lr) track v_k = H_k P_{k-1} and nothing keeps
the implied P positive semi-definite. Per layer and step this script records, on the runner's
``digits`` and ``quadratic`` tasks:

- guard restarts (guard on): S_k not finite or S_k ≤ ε R_k, the layer restarted from sigma·H_k;
- S_k ≤ ε R_k with the guard off (the raw recursion of the released code);
- cos ∠(H_k, v_k) < 0: the angle passes 90°, i.e. H_k P_{k-1} H_kᵀ < 0 — P_{k-1} is not positive
  along H_k;
- S_k < R_k: the gain direction v_k + Q H_k points uphill ((v_k + Q H_k)·H_k = S_k − R_k < 0), the
  step raises the loss to first order although its size η L / S_k is positive.

Usage::

    python benchmarks/guard_stats.py                 # the table for docs/reliability.md
    python benchmarks/guard_stats.py --epochs 5 --seeds 1
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch

import kalmanopt
from kalmanopt.covariance.product import GUARD_EPS
from kalmanopt.runner.tasks import get_task

PRESETS = ("koala++", "koala++-ns", "koala++-lr")
# (task, model, batch size, loss statistic) as the runner's defaults train them
TASKS = (("digits", "mlp", 64, "second_moment"), ("digits", "cnn", 64, "second_moment"),
         ("quadratic", "linear", 32, "second_moment"))
SETTINGS = ({"q": 0.1}, {"q": 0.01}, {"q": 0.0})


@dataclass
class Tally:
    """Counts over every (step, layer) update of a run."""

    updates: int = 0
    restarts: int = 0
    not_positive: int = 0
    obtuse: int = 0
    uphill: int = 0
    nonfinite_steps: int = 0
    final_loss: float = float("nan")
    finite: bool = True

    def percent(self, count: int) -> str:
        return f"{100.0 * count / max(self.updates, 1):.2f}"


def run(task_name: str, model_name: str, batch_size: int, statistic: str, preset: str, setting: dict,
        guard: bool, epochs: int, seed: int) -> Tally:
    task = get_task(task_name)
    data = task.load(task.check_options({}))
    torch.manual_seed(seed)
    model = task.build_model(model_name, data, {})
    opt = kalmanopt.create(preset, model.parameters(), weight_decay=5e-4, guard=guard, track_diagnostics=True,
                           loss_statistic=statistic, **setting)
    tally = Tally()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in task.batches(data, batch_size, generator):
            losses = task.per_sample_loss(model(x), y)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
            R = float(opt.state["group0"]["R"])
            for layer in opt.diagnostics()["layers"].values():
                tally.updates += 1
                tally.not_positive += not (layer["S"] > GUARD_EPS * R)  # NaN counts as not positive
                tally.obtuse += layer["cos_Hv"] < 0.0
                tally.uphill += layer["S"] < R
    counters = opt.diagnostics()["counters"]
    tally.restarts = counters["guard_restarts"]
    tally.nonfinite_steps = counters["nonfinite_steps"]
    with torch.no_grad():
        tally.final_loss = float(task.per_sample_loss(model(data.train_inputs), data.train_targets).mean())
        tally.finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# guard statistics — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.epochs} epochs, seeds 0..{args.seeds - 1}, weight_decay 5e-4, sigma 0.1, lr 1, r online, "
          f"ε = {GUARD_EPS:g}; percentages of (step, layer) updates, summed over seeds\n")
    print("| task / model | preset | q | updates | guard on: restarts | guard on: cos(H,v) < 0 | "
          "guard on: S < R | guard off: S ≤ εR | guard off: cos(H,v) < 0 | guard off: S < R | "
          "train loss on / off |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    start = time.perf_counter()
    for task_name, model_name, batch_size, statistic in TASKS:
        for preset in PRESETS:
            for setting in SETTINGS:
                totals = {}
                for guard in (True, False):
                    total = Tally(final_loss=0.0)
                    for seed in range(args.seeds):
                        t = run(task_name, model_name, batch_size, statistic, preset, setting, guard, args.epochs,
                                seed)
                        total.updates += t.updates
                        total.restarts += t.restarts
                        total.not_positive += t.not_positive
                        total.obtuse += t.obtuse
                        total.uphill += t.uphill
                        total.nonfinite_steps += t.nonfinite_steps
                        total.final_loss += t.final_loss / args.seeds
                        total.finite = total.finite and t.finite
                    totals[guard] = total
                on, off = totals[True], totals[False]
                loss_off = f"{off.final_loss:.4g}" if off.finite else "non-finite"
                print(f"| {task_name} / {model_name} | {preset} | {setting['q']:g} | {on.updates} | "
                      f"{on.restarts} ({on.percent(on.restarts)} %) | {on.percent(on.obtuse)} % | "
                      f"{on.percent(on.uphill)} % | {off.not_positive} ({off.percent(off.not_positive)} %) | "
                      f"{off.percent(off.obtuse)} % | {off.percent(off.uphill)} % | "
                      f"{on.final_loss:.4g} / {loss_off} |", flush=True)
    print(f"\n(total time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
