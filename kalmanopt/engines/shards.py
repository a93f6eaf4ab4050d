"""DTensor shards (FSDP2): whether a tensor is one, and its local part. Read by every engine and checkpoint."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = ["local_tensor", "is_sharded"]


@functools.lru_cache(maxsize=1)
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


#: tensor types that are never DTensors (checked first: the fused engine asks for every parameter each step)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _is_dtensor(t: Any) -> bool:
    if type(t) in _PLAIN:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares its storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor split over ranks (a ``Shard`` placement)."""
    return _is_dtensor(t) and any(p.is_shard() for p in t.placements)
