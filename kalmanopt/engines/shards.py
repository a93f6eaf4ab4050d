"""DTensor shards (FSDP2): whether a tensor is one, and its local part. Read by every engine and checkpoint."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = ["local_tensor", "is_sharded", "counted_here", "full_tensor", "gather_local", "local_part"]


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


def counted_here(t: Tensor) -> bool:
    """Whether this rank's part of ``t`` counts once in a sum over every rank of its mesh: False on every
    replica but the first along a ``Replicate`` mesh dimension (HSDP's replicas hold equal shards; a sum of
    the shards' partial sums over all ranks would count each one once per replica), True otherwise."""
    if not _is_dtensor(t):
        return True
    coordinate = t.device_mesh.get_coordinate()
    return coordinate is None or all(c == 0 for c, placement in zip(coordinate, t.placements)
                                     if placement.is_replicate())


def full_tensor(t: Tensor) -> Tensor:
    """The whole of a sharded DTensor on every rank (an all-gather over its mesh), or ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else local_tensor(t)


def gather_local(flat: Tensor, like: Tensor) -> Tensor:
    """The whole of a per-layer state vector whose local part ``flat`` follows the shards of the DTensor
    ``like`` (a parameter), as one flat tensor on every rank (an all-gather)."""
    cls = _dtensor_type()
    local = flat.view(local_tensor(like).shape)
    whole = cls.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                           stride=like.stride())
    return whole.full_tensor().reshape(-1)


def local_part(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``whole`` (the same on every rank, of ``like``'s global shape) in ``like``'s shards,
    flat: no communication (a replicated tensor redistributed to shards is sliced locally)."""
    from torch.distributed.tensor import Replicate

    cls = _dtensor_type()
    replicated = cls.from_local(whole.reshape(like.shape), like.device_mesh,
                                [Replicate()] * like.device_mesh.ndim, run_check=False)
    return replicated.redistribute(like.device_mesh, like.placements).to_local().reshape(-1)
