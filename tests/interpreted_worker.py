"""The fused engine's kernels run by Triton's interpreter on the CPU, against the reference path.

Run by ``tests/test_fused_interpreted.py`` in a subprocess whose environment has ``TRITON_INTERPRET=1``
(Triton decides when a kernel is defined whether to interpret it). Every fast preset, float64 and float32,
with and without weight decay, through ``step(loss=)`` and ``predict()``/``update()``: the parameters,
the state and the counters against the reference path, and whether the generated kernels ran. Writes
``{case: result}`` with ``torch.save`` to the path given on the command line.
"""

from __future__ import annotations

import sys

import torch
from conformance import relative_error
from test_fast import FAST_PRESETS, _train
from test_fast_gpu import _compare_states

from kalmanopt.engines import _ENGINES
from kalmanopt.engines.fused import interpreting

#: the cases: (preset, dtype, weight decay, API)
CASES = [(preset, dtype, wd, api) for preset in FAST_PRESETS for dtype in (torch.float64, torch.float32)
         for wd in (0.0, 1e-2) for api in ("step", "two-phase")]


def run(preset: str, dtype: torch.dtype, weight_decay: float, api: str) -> dict:
    """One case: the fused (interpreted) run against the reference run."""
    want, ref = _train(preset, "reference", dtype=dtype, weight_decay=weight_decay, api=api)
    got, fast = _train(preset, "fused", dtype=dtype, weight_decay=weight_decay, api=api)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    try:
        _compare_states(fast, ref, 100 * tolerance)
        states = ""
    except AssertionError as e:
        states = f"state differs: {e!r}"
    return {"error": relative_error(got, want), "tolerance": tolerance, "states": states,
            "counters": (fast.diagnostics()["counters"], ref.diagnostics()["counters"]),
            "kernels": any(engine.runs_kernels(fast, fast.param_groups[0]) for engine in _ENGINES["fused"])}


def main(out: str) -> None:
    if not interpreting():
        raise SystemExit("run with TRITON_INTERPRET=1 in the environment")
    torch.save({(p, str(d), wd, api): run(p, d, wd, api) for p, d, wd, api in CASES}, out)


if __name__ == "__main__":
    main(sys.argv[1])
