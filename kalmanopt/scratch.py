"""Reusable temporaries for programs evaluated by torch operations on the CPU.

A program's expressions need temporaries (one per non-linear expression, and the measurement's ``H``).
Allocated afresh each step, a layer-sized temporary on the CPU is fresh memory from the operating system:
its pages fault in at first touch, which costs as much as the arithmetic done in it (the kernel zeroes each
page). A :class:`Scratch` keeps the buffers between steps instead: a step borrows them and gives them back,
so that after the first step no temporary is allocated. It holds at most as many buffers as a step uses
at once, each the size of the largest layer that borrowed it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Scratch"]


class Scratch:
    """A pool of flat buffers lent out as temporaries (one pool per optimizer, kept on its runtime).

    :meth:`take` lends a tensor of the given shape (a view of a pooled buffer); :meth:`give` returns it. A
    tensor given back must no longer be read: the next :meth:`take` may overwrite it.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        self._lent: dict[int, Tensor] = {}

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` that stays the caller's until :meth:`give`."""
        numel = shape[0] if len(shape) == 1 else math.prod(shape)
        free = self._free.setdefault((dtype, device), [])
        best, best_numel = -1, 0
        for i, b in enumerate(free):  # the smallest free buffer that fits
            n = b.numel()
            if n >= numel and (best < 0 or n < best_numel):
                best, best_numel = i, n
        if best >= 0:
            buffer = free.pop(best)
        else:  # (a larger buffer replaces the largest one that is too small: the pool does not grow in count)
            if free:
                free.pop(max(range(len(free)), key=lambda i: free[i].numel()))
            buffer = torch.empty(numel, dtype=dtype, device=device)
        self._lent[id(buffer)] = buffer
        view = buffer.narrow(0, 0, numel)  # (a view even where it is the whole buffer: give finds it by its base)
        return view if len(shape) == 1 else view.view(shape)

    def give(self, tensor: Tensor) -> None:
        """Return a tensor that :meth:`take` lent (anything else is left to the garbage collector)."""
        buffer = self._lent.pop(id(tensor._base), None)
        if buffer is not None:
            self._free[(buffer.dtype, buffer.device)].append(buffer)

    def lent(self, tensor: object) -> bool:
        """Whether ``tensor`` is a temporary this pool has lent and not had back."""
        return isinstance(tensor, Tensor) and id(tensor._base) in self._lent

    def clear(self) -> None:
        """Drop every buffer not lent out (their memory goes back to the allocator)."""
        self._free.clear()

    @property
    def nbytes(self) -> int:
        """The bytes the pool keeps (lent and free)."""
        return sum(b.numel() * b.element_size() for b in [*self._lent.values(), *(x for f in self._free.values()
                                                                                   for x in f)])
