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

import json
from typing import Any, Sequence

import torch
from torch import Tensor

from kalmanopt.engines import ranks
from kalmanopt.engines.runtime import OptimizerView
from kalmanopt.engines.shards import _is_dtensor, counted_here, is_sharded, local_tensor
from kalmanopt.plan import state_table

__all__ = ["AUTO", "check_process_group", "check_group_parameters", "process_group", "is_sharded",
           "local_tensor", "synchronize_update", "synchronize_predict", "all_reduce_sum"]

#: the default of the ``process_group`` option: the initialised default group, if any
AUTO = "auto"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


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
                           contract_gap: str | None = None, group: Any = AUTO) -> None:
    """Refuse DTensor parameters the sharded step cannot run, naming the parameter (``ValueError``).

    Valid: plain tensors, and DTensors whose placements are ``Shard`` or ``Replicate``, all on one
    device mesh per group. A ``Partial`` placement (tensor parallelism's pending sum), parameters
    on different meshes in one group, and a ``"global"`` group that mixes sharded and whole tensors
    are refused, and so are sharded parameters for a composition that does not meet the two-pass
    contract (``contract_gap``: its per-layer ``gain()`` needs whole vectors), and sharded parameters
    whose mesh is not on the ranks of the optimizer's process group ``group`` (the option's value).
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
        if is_sharded(p):
            _check_ranks(p, group, where)
    if granularity == "global" and kinds == {"sharded", "whole"}:
        raise ValueError(f"group {group_index} has granularity='global' and mixes sharded DTensor and whole "
                         "parameters; one filter cannot sum both kinds (use granularity='layer')")


def _resolve(value: Any) -> Any | None:
    """The process group the option's value names, or None (opted out, or no torch.distributed)."""
    if value is None:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if isinstance(value, str) else value


def _check_ranks(p: Tensor, value: Any, where: str) -> None:
    """A sharded parameter must live on the ranks of the process group (``ValueError``)."""
    group = _resolve(value)
    if group is None:
        raise ValueError(f"{where} is sharded over {p.device_mesh}, but the optimizer has no process group "
                         f"(process_group={value!r}, or torch.distributed is not initialised): its sums could "
                         "not be completed; give process_group='auto' or the mesh's group")
    mesh_ranks = sorted(int(r) for r in p.device_mesh.mesh.flatten().tolist())
    ranks = sorted(_dist().get_process_group_ranks(group))
    if mesh_ranks != ranks:
        raise ValueError(f"{where} is sharded over the ranks {mesh_ranks}, but the optimizer's process group has "
                         f"the ranks {ranks}; its reductions would be summed over the wrong ranks (pass "
                         "process_group= the group of the parameters' mesh)")


def process_group(opt: OptimizerView) -> Any | None:
    """The group the optimizer synchronises over, or ``None`` (a single process: nothing to do)."""
    group = _resolve(getattr(opt, "process_group", AUTO))
    if group is None or _dist().get_world_size(group) == 1:
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


def _sharded_rows(works: Sequence[tuple]) -> list[tuple[dict, list[str], Tensor, Tensor | None]]:
    """Per group: its reductions, their names, the indices of its sharded layers (groups with any), and which
    of those rows count here (a bool tensor; None where all do): a replica other than the first along a
    ``Replicate`` mesh dimension (HSDP) sends zeros, so that the sum over every rank counts each shard once."""
    out = []
    for work, red, *_ in works:
        rows = [i for i, sharded in enumerate(work.sharded) if sharded]
        if rows and red:
            device = next(iter(red.values())).device
            layers = ranks.row_layers(work)
            counted = [counted_here(layers[i].params[0]) for i in rows]
            mask = None if all(counted) else torch.tensor(counted, device=device)
            out.append((red, list(red), work.ctx.runtime.int64(rows, device), mask))
    return out


def _reduce_tables(pieces: list[Tensor], tables: list[tuple[dict, list[str], Tensor]], group: Any,
                   device: torch.device) -> list[Tensor]:
    """All-reduce ``pieces`` and the sharded rows of ``tables`` as one tensor; write the rows back.

    Returns the reduced ``pieces``.
    """
    blocks = [torch.stack([red[n] for n in names], 1).index_select(0, rows) for red, names, rows, _ in tables]
    blocks = [b if mask is None else torch.where(mask[:, None], b, 0)  # (where: a NaN not counted here stays out)
              for b, (*_, mask) in zip(blocks, tables)]
    flat_parts = [p.reshape(-1) for p in pieces] + [b.reshape(-1) for b in blocks]
    dtype = _payload_dtype(flat_parts)
    flat = torch.cat([p.to(device=device, dtype=dtype) for p in flat_parts])
    all_reduce_sum(flat, group)
    out = []
    offset = 0
    for p in pieces:
        out.append(flat[offset:offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    for (red, names, rows, _), block in zip(tables, blocks):
        summed = flat[offset:offset + block.numel()].reshape(block.shape)
        offset += block.numel()
        for j, name in enumerate(names):
            column = red[name].clone()
            column.index_copy_(0, rows, summed[:, j].to(column))
            red[name] = column
    return out


def synchronize_update(opt: OptimizerView, loss: Tensor, statistic: Tensor | None,
                       works: Sequence[tuple]) -> tuple[Tensor, Tensor | None]:
    """The hook between pass 1 and the coefficients of an update: the global batch's L_k and s_k.

    Sums this rank's loss moments and the sharded layers' partial reductions (in ``works``, the
    engines' pass-1 results, updated in place) over the process group in one all-reduce. Returns
    (L_k, s_k) of the global batch; on a single process, ``(loss, statistic)`` unchanged.
    """
    group = process_group(opt)
    if group is None:
        return loss, statistic
    n = float(opt.runtime.loss_count)
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
    # (with every rank's gradient census and a row for every sharded layer: the same payload on every rank)
    moments = ranks.reduce_update_payload(moments, works, group, device, all_reduce_sum)
    count = moments[2]
    mean = (moments[0] / count).to(loss.dtype)
    if statistic is None:
        return mean, None
    second_moment = moments[1] / count
    if opt.loss_statistic == "variance":
        return mean, (second_moment - (moments[0] / count) ** 2).to(statistic.dtype)
    return mean, second_moment.to(statistic.dtype)


def synchronize_predict(opt: OptimizerView, works: Sequence[tuple]) -> None:
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


# ---------------------------------------------------------------------- checkpoints (torch.distributed.checkpoint)
#: the key of the non-tensor part (param_groups, the filter, the parameter shapes) in a checkpoint dict
META = "meta"


def _param_index(opt: OptimizerView) -> list[tuple[int, Tensor, str]]:
    """(index in the state dict, parameter, its name for messages), in torch's state-dict order."""
    out = []
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            out.append((len(out), p, f"group {gi}, parameter {pi} (shape {tuple(p.shape)})"))
    return out


def _vector_names(opt: OptimizerView) -> set[str]:
    return {e.name for e in state_table(opt.filter).vectors}


def _as_param_shaped(flat: Tensor, p: Tensor) -> Tensor:
    """A layer's flat local state vector as a tensor of the parameter's global shape (a DTensor if it is one)."""
    local = flat.view(local_tensor(p).shape)
    if not _is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def checkpoint_state_dict(opt: OptimizerView) -> dict[str, Any]:
    """The optimizer's state as a flat dict for ``torch.distributed.checkpoint.save`` (resharding on load).

    Each per-layer state vector is shaped as its parameter and, for a DTensor parameter, is a DTensor
    of the same mesh and placements (its local shard is this rank's state: nothing is gathered), so
    ``torch.distributed.checkpoint`` can load it on any number of ranks. Keys are
    ``"state/<parameter index or group key>/<name>"``; :data:`META` holds ``param_groups``, the
    filter and the parameter shapes. Load with :func:`load_checkpoint_state_dict`.

    Raises:
        ValueError: a sharded group with ``granularity="global"`` (its state is one flat vector of all
            shards, which no parameter's layout describes).
    """
    sd = opt.state_dict()
    params = _param_index(opt)
    vectors = _vector_names(opt)
    out: dict[str, Any] = {}
    for key, entry in sd["state"].items():
        if isinstance(key, int):
            _, p, _ = params[key]
            for name, value in entry.items():
                out[f"state/{key}/{name}"] = _as_param_shaped(value, p) if name in vectors else value
            continue
        for name, value in entry.items():
            if isinstance(value, dict):  # a global layer's state
                index = int(key[5:])
                if any(is_sharded(p) for p in opt.param_groups[index]["params"]):
                    raise ValueError(f"group {index} runs one global filter over sharded parameters; its state "
                                     "cannot be checkpointed with resharding (use granularity='layer')")
                for sub, v in value.items():
                    out[f"state/{key}/{name}/{sub}"] = v
            else:
                out[f"state/{key}/{name}"] = value
    # (one opaque entry: torch.distributed.checkpoint would flatten a dict and its lists)
    out[META] = json.dumps({"param_groups": sd["param_groups"], "filter": sd["filter"],
                              "shapes": [tuple(p.shape) for _, p, _ in params]})
    return out


def _check_mesh(opt: OptimizerView) -> None:
    """Every sharded parameter must live on the ranks of the optimizer's process group (``ValueError``)."""
    for _, p, where in _param_index(opt):
        if is_sharded(p):
            _check_ranks(p, getattr(opt, "process_group", AUTO), where)


def checkpoint_template(opt: OptimizerView, metadata: Any) -> dict[str, Any]:
    """A dict for ``torch.distributed.checkpoint.load`` to fill: this optimizer's layout of the saved keys.

    ``metadata``: the checkpoint's (``FileSystemReader(path).read_metadata()``). Raises ``ValueError``
    naming the parameter when a saved state vector does not have its parameter's shape, or when a
    sharded parameter is not on the optimizer's process group.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check_mesh(opt)
    params = _param_index(opt)
    vectors = _vector_names(opt)
    template: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith("state/"):
            if key.startswith(META):
                template[META] = None
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"checkpoint entry {key!r} is not a tensor")
        parts = key.split("/")
        size, dtype = tuple(meta.size), meta.properties.dtype
        if parts[1].isdigit() and len(parts) == 3 and parts[2] in vectors:
            index = int(parts[1])
            if index >= len(params):
                raise ValueError(f"checkpoint entry {key!r}: the optimizer has {len(params)} parameters")
            _, p, where = params[index]
            if size != tuple(p.shape):
                raise ValueError(f"{where}: the checkpoint's state {parts[2]!r} has the shape {size}; the "
                                 "parameters do not match the ones that were saved")
            local = torch.zeros(local_tensor(p).numel(), dtype=dtype, device=local_tensor(p).device)
            template[key] = _as_param_shaped(local, p)
        else:
            template[key] = torch.zeros(size, dtype=dtype)
    if META not in template:
        raise ValueError("not a kalmanopt optimizer checkpoint (it has no 'meta' entry)")
    return template


def load_checkpoint_state_dict(opt: OptimizerView, loaded: dict[str, Any]) -> None:
    """Load a dict that ``torch.distributed.checkpoint.load`` filled (:func:`checkpoint_template`).

    The local shards become the optimizer's flat state, and :meth:`OptimizerView.load_state_dict`
    checks everything before it commits: on any error nothing changes.
    """
    meta = loaded[META]
    if isinstance(meta, str):
        meta = json.loads(meta)
    vectors = _vector_names(opt)
    state: dict[Any, dict] = {}
    for key, value in loaded.items():
        if key == META:
            continue
        parts = key.split("/")
        owner: Any = int(parts[1]) if parts[1].isdigit() else parts[1]
        entry = state.setdefault(owner, {})
        # (a per-layer state vector was saved in its parameter's shape; a factor keeps its own)
        tensor = local_tensor(value).reshape(-1) if len(parts) == 3 and parts[1].isdigit() \
            and parts[2] in vectors and local_tensor(value).dim() > 0 else local_tensor(value)
        if len(parts) == 4:
            entry.setdefault(parts[2], {})[parts[3]] = tensor
        else:
            entry[parts[2]] = tensor
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"], "filter": meta["filter"]})


def save_checkpoint(opt: OptimizerView, checkpoint_id: str, model_state: dict[str, Any] | None = None) -> None:
    """Save the optimizer (and ``model_state``, e.g. ``model.state_dict()``) with torch.distributed.checkpoint.

    Every rank calls it; each writes its own shards. Works in a single process as well.
    """
    import torch.distributed.checkpoint as dcp

    payload: dict[str, Any] = {"optimizer": checkpoint_state_dict(opt)}
    if model_state is not None:
        payload["model"] = model_state
    dcp.save(payload, checkpoint_id=checkpoint_id)


def load_checkpoint(opt: OptimizerView, checkpoint_id: str, model_state: dict[str, Any] | None = None) -> None:
    """Load what :func:`save_checkpoint` wrote, on any number of ranks (resharded to this layout).

    ``model_state``: the model's state dict to fill in place (``model.state_dict()``), or None. The
    optimizer is checked (shapes, the process group, every value) before anything of it changes.
    """
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(checkpoint_id)
    metadata = reader.read_metadata()
    inner = type(metadata)(state_dict_metadata={k[len("optimizer."):]: v for k, v in
                                                metadata.state_dict_metadata.items() if k.startswith("optimizer.")})
    payload: dict[str, Any] = {"optimizer": checkpoint_template(opt, inner)}
    if model_state is not None:
        payload["model"] = model_state
    dcp.load(payload, checkpoint_id=checkpoint_id)
    load_checkpoint_state_dict(opt, payload["optimizer"])
