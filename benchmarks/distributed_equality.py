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
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import distributed_worker as w  # noqa: E402
from distributed_worker import relative_difference  # noqa: E402


def checkpoint_table(two: tuple[dict, ...], four: tuple[dict, ...], base: Path) -> str:
    """Resumed runs against the uninterrupted one (float64)."""
    lines = ["| preset | saved on | resumed on | largest relative difference |", "|---|---|---|---|"]
    for preset in w.CHECKPOINT_PRESETS:
        ref = w.reference_run(preset, "foreach", torch.float64)
        rows = [("—", "2 (uninterrupted)", [r[("saved", preset)] for r in two]),
                ("1", "2", [r[("loaded", preset)] for r in two]),
                ("2", "1", [w.resume_in_one_process(preset, base / "two" / preset)]),
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
                    if mode == "fsdp" and preset in w.DDP_ONLY:
                        continue  # (refused under FSDP2: docs/structured.md)
                    for engine in w.engines(preset):
                        key = (str(dtype), mode, preset, engine)
                        ref = w.reference_run(preset, engine, dtype)
                        for rank in range(w.WORLD):
                            diff = relative_difference(ranks[rank][key][0], ref)
                            if diff >= worst:
                                worst, where = diff, f"{preset} {engine}"
                        identical &= all(torch.equal(a, b) for a, b in zip(ranks[0][key][0], ranks[1][key][0]))
                lines.append(f"| {str(dtype).replace('torch.', '')} | {mode} | {worst:.2e} | {where} | "
                             f"{w.TOLERANCE[str(dtype)]:.0e} | {'yes' if identical else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Launch, compare, print the table."""
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.distributed.checkpoint in one process says so)
        base = Path(folder)
        w.save_one_process_checkpoints(base)
        two = w.launch("equality,checkpoint", base / "two-ranks", str(base))
        four = w.launch("reload", base / "four-ranks", str(base), world=4)
        print(table(two))
        print()
        print(checkpoint_table(two, four, base))


if __name__ == "__main__":
    main()
