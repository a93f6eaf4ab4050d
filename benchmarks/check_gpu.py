"""A quick check of every fast path on the GPU against the reference path (prints a table)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_fast import FAST_PRESETS, _train, relative_error  # noqa: E402


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for preset in FAST_PRESETS:
        for impl in ("fused", "foreach"):
            for dtype in (torch.float64, torch.float32):
                for wd in (0.0, 1e-2):
                    try:
                        want, ref = _train(preset, "reference", dtype=dtype, weight_decay=wd, device="cuda")
                        got, fast = _train(preset, impl, dtype=dtype, weight_decay=wd, device="cuda")
                        same = fast.diagnostics()["counters"] == ref.diagnostics()["counters"]
                        error = relative_error(got, want)
                        print(f"{preset:11s} {impl:8s} {str(dtype):14s} wd={wd:<5} rel.err {error:.2e}"
                              f" counters {'same' if same else 'DIFFER'}", flush=True)
                    except Exception as error:
                        print(f"{preset:11s} {impl:8s} {str(dtype):14s} wd={wd:<5} FAILED {error!r}", flush=True)


if __name__ == "__main__":
    main()
