"""Memory traffic of every preset's fused step, counted from the declarations the kernels are made from.

    python benchmarks/memory_traffic.py
    python benchmarks/memory_traffic.py --step-times docs/benchmarks.md --set "GPT-2 medium"

The first prints, for every registered preset with its defaults, the vectors the fused engine's passes
read and write per parameter (:func:`kalmanopt.engines.fused.memory_traffic`; no GPU needed), against
AdamW's fused step (7 accesses). On a model large enough to be bound by memory bandwidth, that ratio is
the floor of the step-time ratio. With ``--step-times`` (a file holding the GPU table that
``benchmarks/step_time.py`` prints) it adds the measured step on one parameter set and how close each
step comes to its own floor (the accesses over the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kalmanopt  # noqa: E402
from kalmanopt.engines.fused import memory_traffic  # noqa: E402
from kalmanopt.plan import update_plan  # noqa: E402

#: AdamW's fused step: it reads g, θ, m, v and writes θ, m, v
ADAMW_ACCESSES = 7


def traffic_rows() -> list[tuple[str, object]]:
    """(preset, its MemoryTraffic) for every registered preset, with its default hyper-parameters."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for preset in kalmanopt.presets():
            opt = kalmanopt.create(preset, torch.nn.Linear(2, 2).parameters())
            stages = update_plan(opt.filter, opt.param_groups[0]).stages
            rows.append((preset + (" ¹" if stages else ""), memory_traffic(opt.filter, opt.param_groups[0])))
    return rows


def measured(path: Path, set_name: str) -> tuple[float, float, dict[str, float]]:
    """From a step_time GPU table: the copy bandwidth (bytes/s), the set's parameters, and the fused steps'
    milliseconds by optimizer (``AdamW fused`` and ``<preset> fused``)."""
    text = path.read_text()
    bandwidth = re.search(r"copy bandwidth ([\d.]+) TB/s", text)
    if bandwidth is None:
        raise SystemExit(f"{path}: no 'copy bandwidth … TB/s' line (the header benchmarks/step_time.py prints)")
    times, params = {}, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] == set_name and cells[3].endswith(" fused"):
            params = float(cells[2]) * 1e6
            times[cells[3][: -len(" fused")]] = float(cells[4])
    if params is None or "AdamW" not in times:
        raise SystemExit(f"{path}: no fused rows for the set {set_name!r}")
    return float(bandwidth.group(1)) * 1e12, params, times


def table(rows: list[tuple[str, object]], step_times: tuple[float, float, dict[str, float]] | None = None,
          set_name: str = "") -> str:
    """The Markdown table (see the module's docstring)."""
    head = "| optimizer | passes | reduction pass reads | element-wise pass reads | writes | accesses / parameter " \
           "| floor × AdamW fused |"
    rule = "|---|---|---|---|---|---|---|"
    if step_times is not None:
        head += f" measured × AdamW fused ({set_name}) | % of own floor |"
        rule += "---|---|"
    lines = [head, rule]

    def names(vectors: tuple[str, ...]) -> str:
        return ", ".join(v.removeprefix("state.").replace("theta", "θ") for v in vectors) or "—"

    def extra(name: str, accesses: int) -> str:
        if step_times is None:
            return ""
        bandwidth, params, times = step_times
        if name not in times:
            return " | |"
        floor_ms = accesses * params * 4 / bandwidth * 1e3
        return f" {times[name] / times['AdamW']:.2f} | {100 * floor_ms / times[name]:.0f} % |"

    lines.append(f"| AdamW | 1 | — | g, θ, m, v | θ, m, v | {ADAMW_ACCESSES} | 1.00 |"
                 + extra("AdamW", ADAMW_ACCESSES))
    for preset, t in rows:
        writes = t.update_writes + t.predict_writes
        label = names(t.update_reduce) if not t.predict_reduce else \
            f"{names(t.update_reduce)}; predict: {names(t.predict_reduce)}"
        read_label = names(t.update_reads) if not t.predict_reads else \
            f"{names(t.update_reads)}; predict: {names(t.predict_reads)}"
        lines.append(f"| {preset} | {t.passes} | {label} | {read_label} | {names(writes)} | {t.accesses} | "
                     f"{t.accesses / ADAMW_ACCESSES:.2f} |" + extra(preset.removesuffix(" ¹"), t.accesses))
    if any(preset.endswith(" ¹") for preset, _ in rows):
        lines += ["", "¹ The element-wise passes only: this preset's matrix stages (kalmanopt.matrix) add their "
                  "own reads and writes (the workspace vector they fill, the stacked layers, the factors)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step-times", type=Path, help="a file with the GPU table of benchmarks/step_time.py")
    parser.add_argument("--set", default="GPT-2 medium", help="the parameter set whose measured steps to use")
    args = parser.parse_args(argv)
    step_times = measured(args.step_times, args.set) if args.step_times else None
    print(table(traffic_rows(), step_times, args.set))


if __name__ == "__main__":
    main()
