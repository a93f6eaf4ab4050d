"""The small regression problem several behaviour tests share: a 4-3-2 tanh MLP fitting random targets,
per-sample squared errors, the plain training loop, and the tensors of a nested state."""

from __future__ import annotations

from typing import Any, Iterator

import torch


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)


def tiny_losses(model: torch.nn.Module, k: int) -> torch.Tensor:
    """The per-sample losses of batch ``k`` (8 samples, the same for every model of the same dtype)."""
    g = torch.Generator().manual_seed(k)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(8, 4, generator=g).to(dtype), torch.randn(8, 2, generator=g).to(dtype)
    return ((model(x) - y) ** 2).mean(dim=1)


def backward_losses(opt: torch.optim.Optimizer, model: torch.nn.Module, k: int) -> torch.Tensor:
    """CoefficientStage ``k``'s gradients into ``.grad`` (zeroed first); its per-sample losses, detached."""
    losses = tiny_losses(model, k)
    opt.zero_grad()
    losses.mean().backward()
    return losses.detach()


def train(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: range) -> None:
    """``opt.step(loss=per-sample losses)`` on batches ``steps``."""
    for k in steps:
        opt.step(loss=backward_losses(opt, model, k))


def state_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) pairs of a nested state, in a stable order."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from state_tensors(value[key], f"{prefix}/{key}")
