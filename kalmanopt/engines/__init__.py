"""Engines: how a step is computed, selected by name like torch's ``foreach`` / ``fused`` flags.

- ``"reference"``: the readable per-layer engine (:mod:`kalmanopt.engines.reference`); runs every
  composition, also surrogates written per layer with ``gain()``.
- ``"foreach"``: the multi-tensor engine (:mod:`kalmanopt.engines.torch_ops`), any device, no host
  synchronisation; runs every composition whose parts meet the two-pass contract.
- ``"fused"``: Triton kernels generated from the parts' declarations (:mod:`kalmanopt.engines.fused`), CUDA.
- ``None``: the fastest engine that can run the composition and the group.

No engine branches on which part it runs: each executes the contract of :mod:`kalmanopt.contract`.
"""

from kalmanopt.engines.selection import (
    IMPLEMENTATIONS,
    Engine,
    available_implementations,
    register_engine,
    resolve_engine,
)

__all__ = ["IMPLEMENTATIONS", "Engine", "register_engine", "resolve_engine", "available_implementations"]
