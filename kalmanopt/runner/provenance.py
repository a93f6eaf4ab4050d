"""What was run, on what: the environment, the optimizers as built, and the engine each one ran on.

- :func:`environment`: the device actually used (with the GPU's name), torch / triton /
  kalmanopt / Python versions, the git commit of the kalmanopt checkout when there is one.
- :func:`resolved_hyperparameters`: every hyper-parameter of a built optimizer, read from its
  ``param_groups`` (so defaults the config left out are there too).
- :func:`engine_of`: ``fused``, ``foreach`` or ``reference`` for a Kalman optimizer (the
  implementation its groups resolved to), ``torch`` for a baseline.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import kalmanopt
from kalmanopt.engines import resolve_engine as resolve_implementation
from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["environment", "resolved_hyperparameters", "engine_of", "git_commit"]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the kalmanopt source tree (``+dirty`` with uncommitted changes), or None."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H200``), or the CPU's description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return platform.processor() or platform.machine() or "CPU"


def environment(device: torch.device, requested: str | None = None) -> dict[str, Any]:
    """The machine and software a run used (see the module docstring)."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_requested": requested if requested is not None else str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "kalmanopt": kalmanopt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def resolved_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every hyper-parameter of the first parameter group as built (``params`` left out).

    Read from ``optimizer.param_groups`` so that defaults the config did not set are included;
    a ``group<i>.`` prefix marks values that differ in a later group.
    """
    groups = optimizer.param_groups
    first = {k: _plain(v) for k, v in groups[0].items() if k != "params"}
    for index, group in enumerate(groups[1:], 1):
        for key, value in group.items():
            if key != "params" and _plain(value) != first.get(key):
                first[f"group{index}.{key}"] = _plain(value)
    for attribute in ("loss_statistic", "strict", "track_diagnostics"):
        if hasattr(optimizer, attribute) and attribute not in first:
            first[attribute] = _plain(getattr(optimizer, attribute))
    return first


def engine_of(optimizer: torch.optim.Optimizer) -> str:
    """The implementation the optimizer runs on: ``fused``, ``foreach``, ``reference`` (per group, joined
    by ``+`` when they differ), or ``torch`` for a torch.optim baseline."""
    if not isinstance(optimizer, KalmanOptimizer):
        return "torch"
    names = [resolve_implementation(optimizer.filter, group).name for group in optimizer.param_groups]
    return "+".join(dict.fromkeys(names))
