"""Two processes against one: how far DDP and FSDP2 runs land from one process on the same global batch.

On the CPU (gloo, two forked ranks)::

    python benchmarks/distributed_equality.py

It launches the equality and checkpoint scenarios of ``tests/distributed_worker.py`` (every preset
on every CPU engine, DDP and FSDP2, float32 and float64, four steps of a small MLP with uneven
shards and an empty one), runs each case in one process on the whole global batch, and prints one
row per precision and mode: the largest relative difference of the parameters over the ranks,
presets and engines (and which case it was), against the tests' tolerance, and whether the ranks'
parameters were bit-identical. A second table resumes FSDP2 checkpoints (float64, after two of the
four steps) across 1, 2 and 4 processes and compares with the uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import distributed_worker as w  # noqa: E402

import kalmanopt  # noqa: E402
from kalmanopt.engines import distributed  # noqa: E402

#: the tests' tolerances (``tests/test_distributed.py``)
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-10}


def relative_difference(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The largest difference of any tensor from its reference, relative to the reference's largest entry."""
    return max(float((a.detach() - b).abs().max() / b.abs().max()) for a, b in zip(params, ref))


def launch(scenarios: str, out: Path, base: Path, world: int = w.WORLD) -> tuple[dict, ...]:
    """``scenarios`` of the worker on ``world`` CPU ranks (checkpoints under ``base``); each rank's results."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DISTRIBUTED_WORKER_WORLD=str(world))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed_worker.py"), scenarios, str(out),
                           str(base)], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the ranks failed:\n{done.stderr[-4000:]}")
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world))


def save_one_process_checkpoints(base: Path) -> None:
    """What one process saves after two steps (``base/one/<preset>``), for the ranks to resume."""
    for preset in w.CHECKPOINT_PRESETS:
        model = w.make_model(torch.float64)
        opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **w.HP)
        w.train(model, opt, torch.float64, range(2), None)
        distributed.save_checkpoint(opt, str(base / "one" / preset), model.state_dict())


def resume_in_one_process(preset: str, path: Path) -> list[torch.Tensor]:
    """Load what two ranks saved into one process (a model of other initial values) and train on."""
    model = w.mlp(5).double()
    opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **w.HP)
    state = model.state_dict()
    distributed.load_checkpoint(opt, str(path), state)
    model.load_state_dict(state)
    w.train(model, opt, torch.float64, range(2, w.STEPS), None)
    return list(model.parameters())


def checkpoint_table(two: tuple[dict, ...], four: tuple[dict, ...], base: Path) -> str:
    """Resumed runs against the uninterrupted one (float64)."""
    lines = ["| preset | saved on | resumed on | largest relative difference |", "|---|---|---|---|"]
    for preset in w.CHECKPOINT_PRESETS:
        ref = w.reference_run(preset, "foreach", torch.float64)
        rows = [("—", "2 (uninterrupted)", [r[("saved", preset)] for r in two]),
                ("1", "2", [r[("loaded", preset)] for r in two]),
                ("2", "1", [resume_in_one_process(preset, base / "two" / preset)]),
                ("2", "4", [r[("reloaded", preset)] for r in four])]
        for saved, resumed, runs in rows:
            worst = max(relative_difference(params, ref) for params in runs)
            lines.append(f"| {preset} | {saved} | {resumed} | {worst:.1e} |")
    return "\n".join(lines)


def table(ranks: tuple[dict, ...]) -> str:
    """One row per precision and mode (see the module's docstring)."""
    lines = [f"{w.WORLD} CPU processes (gloo) against one on the same global batch, {w.STEPS} steps, "
             f"torch {torch.__version__}", "",
             "| dtype | mode | largest relative difference | where | tolerance | ranks bit-identical |",
             "|---|---|---|---|---|---|"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in w.DTYPES:
            for mode in ("ddp", "fsdp"):
                worst, where, identical = 0.0, "", True
                for preset in w.PRESETS:
                    for engine in w.engines(preset):
                        key = (str(dtype), mode, preset, engine)
                        ref = w.reference_run(preset, engine, dtype)
                        for rank in range(w.WORLD):
                            diff = relative_difference(ranks[rank][key][0], ref)
                            if diff >= worst:
                                worst, where = diff, f"{preset} {engine}"
                        identical &= all(torch.equal(a, b) for a, b in zip(ranks[0][key][0], ranks[1][key][0]))
                lines.append(f"| {str(dtype).replace('torch.', '')} | {mode} | {worst:.2e} | {where} | "
                             f"{TOLERANCE[dtype]:.0e} | {'yes' if identical else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Launch, compare, print the table."""
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.distributed.checkpoint in one process says so)
        base = Path(folder)
        save_one_process_checkpoints(base)
        two = launch("equality,checkpoint", base / "two-ranks", base)
        four = launch("reload", base / "four-ranks", base, world=4)
        print(table(two))
        print()
        print(checkpoint_table(two, four, base))


if __name__ == "__main__":
    main()
