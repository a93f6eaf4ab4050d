"""Profile the optimizer step of one preset on one parameter set (kernel times and host time per step).

    python benchmarks/profile_step.py koala-v ResNet-50
    python benchmarks/profile_step.py koala-kron "GPT-2 small" --option refresh=10 --matmul-precision high --host

``--option name=value`` (repeatable) sets a hyper-parameter of the preset; ``--matmul-precision`` is passed to
``torch.set_float32_matmul_precision`` (``high``: TF32 matmuls, for the matrix stages of the structured presets).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_time import PARAMETER_SETS, kalman_builder, make_params  # noqa: E402


def main() -> None:
    preset, set_name = sys.argv[1], sys.argv[2]
    implementation = sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else "fused"
    options = {}
    for i, arg in enumerate(sys.argv):
        if arg == "--option":
            name, value = sys.argv[i + 1].split("=", 1)
            options[name] = float(value) if any(c in value for c in ".e") else int(value)
        if arg == "--matmul-precision":
            torch.set_float32_matmul_precision(sys.argv[i + 1])
    params = make_params(PARAMETER_SETS[set_name](), torch.device("cuda"))
    _, step = kalman_builder(preset, implementation, **options)(params)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    host = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 20 * 1e3
    print(f"{preset} {implementation} {options} on {set_name}: host {host:.3f} ms/step, wall {wall:.3f} ms/step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if "--host" in sys.argv:  # where the host time goes (Python functions)
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
