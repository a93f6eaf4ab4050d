"""What the ranks of a distributed step agree on, in the step's one all-reduce (several processes).

A step over several processes must run the same collectives on every rank, whatever each rank's
gradients: a rank that leaves ``step()`` early (no gradient: a branch not taken, a frozen expert, its
gradients dropped) while the others wait in the all-reduce puts the ranks out of step (a gloo read
error, a hang, or weights that diverge silently). So every rank takes part in the update's all-reduce,
and what it carries does not depend on the gradients:

- the loss moments (Σ ℓ, Σ ℓ², n; a rank with an empty micro-batch contributes n = 0);
- a **gradient census**: per layer of every group, 1 where this rank has its gradient. After the sum,
  every rank knows how many ranks have each layer's gradient;
- the sharded layers' partial sums, one row for **every** sharded layer of the group (zeros where this
  rank has no gradient for it), so the payload has the same size on every rank.

Then every rank decides alike (:func:`agree`): a layer whose gradient is on every rank or on none is
updated or left alone (a frozen layer) as in one process; no gradient on any rank skips the step on
every rank (nothing but a first predict changes, as for a skipped step); a layer whose gradient is on
some ranks only is refused on **every** rank together with :class:`RanksDisagree` (a
``RuntimeError``) naming the layer and the ranks' count, before any weight or filter state changes —
the replicas (DDP) or the shards (FSDP2) of one layer cannot take different steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from kalmanopt.engines.shards import counted_here, is_sharded

__all__ = ["RanksDisagree", "NoGradientOnAnyRank", "reduce_update_payload", "agree", "row_layers"]


class RanksDisagree(RuntimeError):
    """The ranks of a distributed step do not have the same layers' gradients; refused on every rank."""


class NoGradientOnAnyRank(Exception):
    """No rank has any gradient in this step: every rank skips it (the driver warns once, nothing changes)."""


def _has_gradient(layer: Any) -> bool:
    return any(p.grad is not None for p in layer.params)


def _is_sharded(layer: Any) -> bool:
    return any(is_sharded(p) for p in layer.params)


def row_layers(work: Any) -> list[Any]:
    """The layers of the rows of a work's pass-1 table (the engines' active layers, in order)."""
    layers = work.extra.get("layers") if isinstance(getattr(work, "extra", None), dict) else None
    if layers is None:
        layers = [f.layer for f in getattr(work, "flats", [])]
    return list(layers)


def _census(works: Sequence[tuple]) -> Tensor:
    """Per layer of every group (in order), 1.0 where this rank has its gradient."""
    flags = [1.0 if _has_gradient(layer) else 0.0 for work, *_ in works for layer in work.ctx.layers]
    return torch.tensor(flags, dtype=torch.float64)


def _blocks(works: Sequence[tuple]) -> list[tuple[dict, list[str], list[int], list[int], list[bool], int]]:
    """Per group with sharded layers: (its reductions, their names, the rows of this rank's table that are
    sharded, their positions among the group's sharded layers, whether each row counts here, the number of
    those layers).

    A row of a replica other than the first along a ``Replicate`` mesh dimension (HSDP) is sent as zeros: the
    first replica's equal shard carries it, so that the sum over every rank counts each shard once; every
    rank reads the sum back."""
    out = []
    for work, red, *_ in works:
        sharded = [layer for layer in work.ctx.layers if _is_sharded(layer)]
        if not sharded:
            continue
        position = {id(layer.params[0]): j for j, layer in enumerate(sharded)}
        rows, positions, counted = [], [], []
        for i, layer in enumerate(row_layers(work)):
            j = position.get(id(layer.params[0]))
            if j is not None:
                rows.append(i)
                positions.append(j)
                counted.append(counted_here(layer.params[0]))
        out.append((red, list(red), rows, positions, counted, len(sharded)))
    return out


def reduce_update_payload(moments: Tensor, works: Sequence[tuple], group: Any, device: torch.device,
                          all_reduce: Any) -> Tensor:
    """Sum ``moments``, the gradient census and the sharded rows over ``group`` in ONE all-reduce; write the
    summed rows back into the works' tables; check the census (:func:`agree`). Returns the summed moments.

    ``all_reduce(tensor, group)`` sums in place (the optimizer's one collective).

    Raises:
        RanksDisagree: some layer's gradient is on some ranks only (raised on every rank).
        NoGradientOnAnyRank: no rank has any gradient (raised on every rank).
    """
    census = _census(works)
    blocks = _blocks(works)
    dtype = torch.float64 if device.type != "mps" else torch.float32
    parts = [moments.reshape(-1).to(device=device, dtype=dtype), census.to(device=device, dtype=dtype)]
    for red, names, rows, positions, counted, n in blocks:
        block = torch.zeros(n, len(names), dtype=dtype, device=device)
        sent = [(i, j) for i, j, here in zip(rows, positions, counted) if here]
        if sent:
            table = torch.stack([red[name] for name in names], 1).to(device=device, dtype=dtype)
            index = torch.tensor([i for i, _ in sent], device=device)
            block.index_copy_(0, torch.tensor([j for _, j in sent], device=device), table.index_select(0, index))
        parts.append(block.reshape(-1))
    flat = torch.cat(parts)
    all_reduce(flat, group)
    offset = moments.numel()
    summed_moments = flat[:offset].reshape(moments.shape)
    counts = flat[offset:offset + census.numel()]
    offset += census.numel()
    agree(counts, _world(group), works)
    for red, names, rows, positions, _counted, n in blocks:
        summed = flat[offset:offset + n * len(names)].reshape(n, len(names))
        offset += n * len(names)
        if not rows:
            continue
        index = torch.tensor(rows, device=next(iter(red.values())).device)
        picked = summed.index_select(0, torch.tensor(positions, device=device))
        for j, name in enumerate(names):
            column = red[name].clone()
            column.index_copy_(0, index, picked[:, j].to(column))
            red[name] = column
    return summed_moments


def _world(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def agree(counts: Tensor, world: int, works: Sequence[tuple]) -> None:
    """Decide, from the summed census, what every rank does alike (see the module).

    Raises:
        RanksDisagree, NoGradientOnAnyRank: as :func:`reduce_update_payload`.
    """
    values = [int(round(float(c))) for c in counts.cpu()]
    names = [(gi, li) for gi, (work, *_) in enumerate(works) for li in range(len(work.ctx.layers))]
    split = [(where, c) for where, c in zip(names, values) if 0 < c < world]
    if split:
        _forget_new_state(works)
        (gi, li), c = split[0]
        raise RanksDisagree(
            f"the ranks disagree on the gradients of this step: group {gi}, layer {li} has a gradient on {c} of "
            f"{world} ranks ({len(split)} layer(s) like it); the step was refused on every rank and nothing "
            "changed. Every rank must have the same layers' gradients (the replicas or shards of a layer cannot "
            "take different steps): give the ranks without one a zero gradient (p.grad = torch.zeros_like(p), "
            "or a loss of 0 * output.sum()), or freeze the layer on every rank")
    if values and not any(values):
        raise NoGradientOnAnyRank()
    if not values:
        raise NoGradientOnAnyRank()


def _forget_new_state(works: Sequence[tuple]) -> None:
    """Drop the per-layer state pass 1 created for this step (a refused first update leaves none)."""
    for work, *_ in works:
        created, keys = work.extra.get("created", ((), ())) if isinstance(getattr(work, "extra", None), dict) \
            else ((), ())
        for layer, new in zip(row_layers(work), created):
            if new:
                for key in keys:
                    layer.state.pop(key, None)
