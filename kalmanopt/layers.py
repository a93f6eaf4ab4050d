"""A *layer*: the unit one filter runs on, one parameter tensor or, globally, all of a group.

The reference path works on flat vectors in the state's precision (float32 at least, so bf16 and
fp16 parameters keep fp32 filter state) and writes the result back to the parameters, which keeps
the arithmetic readable and the same for both granularities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Layer", "state_dtype", "stored_dtype", "vector_dtype", "group_key"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision filter state is kept in for parameters of ``dtype`` (at least float32)."""
    return torch.promote_types(dtype, torch.float32)


def stored_dtype(option: str | None) -> torch.dtype | None:
    """The precision per-layer vectors are stored in for a group whose ``state_dtype`` is ``option``: bfloat16
    (stochastically rounded on every write; the arithmetic stays in the state's precision), or ``None`` for
    the state's own."""
    return torch.bfloat16 if option == "bfloat16" else None


def vector_dtype(option: str | None, dtype: torch.dtype) -> torch.dtype:
    """The precision the per-layer vectors of a parameter of ``dtype`` are stored in (:func:`stored_dtype`)."""
    stored = stored_dtype(option)
    return state_dtype(dtype) if stored is None else stored


@dataclass
class Layer:
    """One filter's slice of a parameter group.

    Attributes:
        params: the parameter tensors, flattened and concatenated in this order.
        state: the filter state of this layer (tensors only; lives in ``optimizer.state``).
        name: a printable name (``"group0/param3"`` or ``"group0/global"``) for diagnostics.
        stored: the precision the per-layer vectors are stored in (:func:`vector_dtype`); ``None``: the state's.
    """

    params: list[Tensor]
    state: dict
    name: str
    stored: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The precision of this layer's filter state."""
        return state_dtype(self.params[0].dtype)

    @property
    def vector_dtype(self) -> torch.dtype:
        """The precision this layer's per-layer vectors are stored in (workspace vectors excepted)."""
        return self.dtype if self.stored is None else self.stored

    @property
    def numel(self) -> int:
        """Number of scalar parameters in the layer."""
        return sum(p.numel() for p in self.params)

    def theta(self) -> Tensor:
        """θ: the parameters as one flat vector (a copy, in the state's precision)."""
        return torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])

    def grad(self) -> Tensor | None:
        """g: the gradient as one flat vector, ``None`` if no parameter has a gradient.

        In a global layer a parameter without a gradient contributes zeros.
        """
        if all(p.grad is None for p in self.params):
            return None
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(self.dtype)
                for p in self.params
            ]
        )

    def write(self, theta: Tensor) -> None:
        """Copy the flat vector ``theta`` back into the parameters."""
        offset = 0
        for p in self.params:
            n = p.numel()
            p.detach().copy_(theta[offset : offset + n].view_as(p))
            offset += n


def group_key(index: int) -> str:
    """The key of group ``index``'s shared state in ``optimizer.state`` (``"group0"``, ...)."""
    return f"group{index}"
