"""The fused engine's launch configuration and whether Triton is there (read by the kernels and the engine)."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["CONFIG", "triton_available", "interpreting"]

#: launch configuration: elements per program (chunk), per block, warps per program
CONFIG = {"chunk": 8192, "block": 1024, "warps": 4}


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` in the environment): the fused
    engine then also runs on CPU tensors where ``implementation="fused"`` is asked for, the same generated
    kernels executed by Triton on the host (slowly: for tests of the kernels without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
