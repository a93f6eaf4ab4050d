"""Data-parallel (DDP) and sharded (FSDP2 / DTensor) steps: one small collective per step, in one place.

The step driver calls :func:`synchronize_update` between pass 1 (the per-layer reductions) and the
coefficients, and :func:`synchronize_predict` at the same point of a predict. Everything a rank
measures that the other ranks need is packed into ONE tensor and summed with ONE
``torch.distributed.all_reduce``:

- the loss moments of this rank's samples: Σ ℓ_i, Σ ℓ_i², n (the global batch's L_k and s_k follow);
- for every layer whose parameters are DTensor shards (FSDP2's ``fully_shard``), its row of the
  ``[layers × reductions]`` table: each reduction is a sum over the elements, so the sum of the
  ranks' partial sums is the layer's (the ``nonfinite`` column carries a NaN of any shard).

After the all-reduce every rank holds the same numbers, so the coefficients, the skip rule and the
non-finite policy agree on every rank, and the element-wise pass runs on the local shards: nothing
is gathered. Under DDP the gradients are already averaged by DDP, so only the loss moments travel
(3 numbers). A predict whose dynamics have reductions (KOALA-M's ‖w̄ − θ‖²) on sharded layers
needs its own all-reduce; every other predict needs none.

The optimizer's ``process_group`` option picks the group: ``"auto"`` (the default) uses the
initialised default group (a world of one process changes nothing), ``None`` opts out (each
process filters its own loss), or a ``ProcessGroup``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["AUTO", "check_process_group", "check_group_parameters", "process_group", "is_sharded",
           "local_tensor", "synchronize_update", "synchronize_predict", "all_reduce_sum"]

#: the default of the ``process_group`` option: the initialised default group, if any
AUTO = "auto"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares its storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor split over ranks (a ``Shard`` placement)."""
    return _is_dtensor(t) and any(p.is_shard() for p in t.placements)


def check_process_group(value: Any) -> Any:
    """``value`` if it is a valid ``process_group`` option (``"auto"``, ``None`` or a ``ProcessGroup``).

    Raises:
        TypeError: anything else, naming the valid choices.
    """
    if value is None or (isinstance(value, str) and value == AUTO):
        return value
    dist = _dist()
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    raise TypeError(f"process_group must be 'auto' (the default process group when torch.distributed is "
                    f"initialised), None (no synchronisation) or a torch.distributed.ProcessGroup; got "
                    f"{type(value).__name__} {value!r}")


def check_group_parameters(params: Sequence[Tensor], group_index: int, granularity: str,
                           contract_gap: str | None = None) -> None:
    """Refuse DTensor parameters the sharded step cannot run, naming the parameter (``ValueError``).

    Valid: plain tensors, and DTensors whose placements are ``Shard`` or ``Replicate``, all on one
    device mesh per group. A ``Partial`` placement (tensor parallelism's pending sum), parameters
    on different meshes in one group, and a ``"global"`` group that mixes sharded and whole tensors
    are refused, and so are sharded parameters for a composition that does not meet the two-pass
    contract (``contract_gap``: its per-layer ``gain()`` needs whole vectors).
    """
    mesh = None
    first = None
    kinds = set()
    for i, p in enumerate(params):
        where = f"group {group_index}, parameter {i} (shape {tuple(p.shape)})"
        if not _is_dtensor(p):
            kinds.add("whole")
            continue
        for placement in p.placements:
            if not (placement.is_shard() or placement.is_replicate()):
                raise ValueError(f"{where} has the DTensor placement {placement}; the optimizer runs on Shard "
                                 "(FSDP2) and Replicate placements only (a Partial value is a pending sum: "
                                 "redistribute it to Shard or Replicate first)")
        if mesh is None:
            mesh, first = p.device_mesh, i
        elif p.device_mesh != mesh:
            raise ValueError(f"{where} lives on the device mesh {p.device_mesh}, parameter {first} of the same "
                             f"group on {mesh}; put the parameters of different meshes in different "
                             "parameter groups")
        kinds.add("sharded" if is_sharded(p) else "whole")
        if contract_gap is not None and is_sharded(p):
            raise ValueError(f"{where} is a sharded DTensor, and {contract_gap}: a surrogate written per layer "
                             "needs whole vectors; use a preset whose parts meet the contract, or DDP")
    if granularity == "global" and kinds == {"sharded", "whole"}:
        raise ValueError(f"group {group_index} has granularity='global' and mixes sharded DTensor and whole "
                         "parameters; one filter cannot sum both kinds (use granularity='layer')")


def process_group(opt: KalmanOptimizer) -> Any | None:
    """The group the optimizer synchronises over, or ``None`` (a single process: nothing to do)."""
    value = getattr(opt, "process_group", AUTO)
    if value is None:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if isinstance(value, str) else value
    if dist.get_world_size(group) == 1:
        return None
    return group


def all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """Sum ``t`` over ``group`` in place (the optimizer's one collective per step)."""
    _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=group)
    return t


def _payload_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float64
    device = tensors[0].device
    if device.type == "mps":  # pragma: no cover - no float64 there
        dtype = torch.float32
    return dtype


def _sharded_rows(works: Sequence[tuple]) -> list[tuple[dict, list[str], Tensor]]:
    """Per group: its reductions, their names and the indices of its sharded layers (groups with any)."""
    out = []
    for work, red, *_ in works:
        rows = [i for i, f in enumerate(work.flats) if getattr(f, "sharded", False)]
        if rows and red:
            device = next(iter(red.values())).device
            out.append((red, list(red), torch.tensor(rows, dtype=torch.int64, device=device)))
    return out


def _reduce_tables(pieces: list[Tensor], tables: list[tuple[dict, list[str], Tensor]], group: Any,
                   device: torch.device) -> list[Tensor]:
    """All-reduce ``pieces`` and the sharded rows of ``tables`` as one tensor; write the rows back.

    Returns the reduced ``pieces``.
    """
    blocks = [torch.stack([red[n] for n in names], 1).index_select(0, rows) for red, names, rows in tables]
    flat_parts = [p.reshape(-1) for p in pieces] + [b.reshape(-1) for b in blocks]
    dtype = _payload_dtype(flat_parts)
    flat = torch.cat([p.to(device=device, dtype=dtype) for p in flat_parts])
    all_reduce_sum(flat, group)
    out = []
    offset = 0
    for p in pieces:
        out.append(flat[offset:offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    for (red, names, rows), block in zip(tables, blocks):
        summed = flat[offset:offset + block.numel()].reshape(block.shape)
        offset += block.numel()
        for j, name in enumerate(names):
            column = red[name].clone()
            column.index_copy_(0, rows, summed[:, j].to(column))
            red[name] = column
    return out


def synchronize_update(opt: KalmanOptimizer, loss: Tensor, statistic: Tensor | None,
                       works: Sequence[tuple]) -> tuple[Tensor, Tensor | None]:
    """The hook between pass 1 and the coefficients of an update: the global batch's L_k and s_k.

    Sums this rank's loss moments and the sharded layers' partial reductions (in ``works``, the
    engines' pass-1 results, updated in place) over the process group in one all-reduce. Returns
    (L_k, s_k) of the global batch; on a single process, ``(loss, statistic)`` unchanged.
    """
    group = process_group(opt)
    if group is None:
        return loss, statistic
    n = float(getattr(opt, "_loss_count", 1))
    # this rank's Σ ℓ, Σ ℓ², n, from its mean and statistic (one sample per rank for update(mean, s))
    second = None
    if statistic is not None:
        second = statistic + loss * loss if opt.loss_statistic == "variance" else statistic
    moments = torch.stack([loss.to(torch.float64) * n,
                           (second if second is not None else loss * loss).to(torch.float64) * n,
                           torch.tensor(n, dtype=torch.float64, device=loss.device)])
    device = loss.device
    for _work, red, *_ in works:
        if red:
            device = next(iter(red.values())).device
            break
    (moments,) = _reduce_tables([moments], _sharded_rows(works), group, device)
    count = moments[2]
    mean = (moments[0] / count).to(loss.dtype)
    if statistic is None:
        return mean, None
    second_moment = moments[1] / count
    if opt.loss_statistic == "variance":
        return mean, (second_moment - (moments[0] / count) ** 2).to(statistic.dtype)
    return mean, second_moment.to(statistic.dtype)


def synchronize_predict(opt: KalmanOptimizer, works: Sequence[tuple]) -> None:
    """The hook between a predict's reductions and its coefficients: sums sharded layers' partial sums.

    Nothing travels when no group has a sharded layer with predict reductions.
    """
    tables = _sharded_rows(works)
    if not tables:
        return
    group = process_group(opt)
    if group is None:
        return
    device = next(iter(tables[0][0].values())).device
    _reduce_tables([], tables, group, device)
