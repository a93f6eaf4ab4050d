"""What a user may change between steps besides the hyper-parameters, and what the state then needs.

:func:`kalmanopt.groups.validate_groups` calls :func:`check_structure` at the start of every
``step``/``update``/``predict``, after the values of the groups have been checked and before anything
is read. It compares the groups with the state they have (no bookkeeping of its own: the state's
layout says how it was made) and either honours a change, so that the next ``state_dict()`` loads
into an identical optimizer, or refuses it with a ``ValueError`` naming the group, the change and what
to do, nothing changed:

- **granularity** changed from ``"layer"`` to ``"global"`` (or back) on a group whose filter keeps
  per-layer state: refused. The per-layer memory (KOALA++'s v, H, S; KOALA-M's velocity) does not
  convert into one global filter's (the per-layer S_ℓ do not combine into a global S) and dropping it
  would restart the filter silently. Set it back, or build a new optimizer for the new granularity.
  A filter without per-layer state (KOALA-V) switches freely: there is nothing to convert.
- **parameters removed from a group** (``group["params"]`` edited): their state is dropped (torch would
  keep it and fail in ``state_dict()``); a global filter whose parameters changed is refused (its
  state is one vector over the old parameters).
- **the parameters' precision or device changed** (``model.double()``, ``model.to(...)``), or the group's
  ``state_dtype``: the state follows them, in the precision it would be created in (the parameters', at
  least float32; the per-layer vectors in bfloat16 under ``state_dtype="bfloat16"``), as a checkpoint
  loaded into the moved model would. (Vectors narrowed by a change of ``state_dtype`` are rounded to
  nearest, once.)
- **optimizer options written into a group** (``group["loss_statistic"] = "variance"``): refused,
  naming the attribute that holds them (``opt.loss_statistic``); a group does not read them.

Options that change nothing in the state's layout (``implementation``, ``guard``, ``weight_decay``,
``r``, ``lr``, a group added with ``add_param_group``) need nothing here: the checks of the values
cover them, and the state dict round-trips (tested).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch
from torch import Tensor

from kalmanopt.engines.shards import local_tensor
from kalmanopt.layers import group_key, state_dtype, vector_dtype
from kalmanopt.options import OPTIMIZER_OPTIONS
from kalmanopt.plan import state_table


class StructureOwner(Protocol):
    """What the checks read of the optimizer (:class:`~kalmanopt.KalmanOptimizer`)."""

    filter: Any
    param_groups: list[dict[str, Any]]
    state: Any
    loss_statistic: str
    runtime: Any  # (its ``structure_seen``: the layout the last check left)

__all__ = ["check_structure"]


@torch.compiler.disable
def check_structure(opt: StructureOwner) -> None:
    """Refuse a change to the groups that the state cannot follow, else make the state follow it.

    Opaque to ``torch.compile`` (a compiled ``opt.step`` runs it as written: it reads the state's dicts).

    Raises:
        ValueError: as the module says, naming the group; nothing has changed then.
    """
    for index, group in enumerate(opt.param_groups):
        _check_group(opt, index, group)
    layout = _layout(opt)
    if layout == getattr(opt.runtime, "structure_seen", None):
        return  # the same parameters, precisions, devices and state as the last check left: nothing to follow
    # every check passed: now the changes that are honoured
    grouped = {id(p) for group in opt.param_groups for p in group["params"]}
    for key in [k for k in opt.state if isinstance(k, Tensor) and id(k) not in grouped]:
        del opt.state[key]  # a parameter no longer in any group
    for index, group in enumerate(opt.param_groups):
        _follow_parameters(opt, index, group)
    opt.runtime.structure_seen = _layout(opt)


def _layout(opt: StructureOwner) -> tuple:
    """What the state follows: the state's container and size, each group's parameters, their precisions and
    devices (a step that finds them as the last check left them has nothing to move or drop)."""
    return (id(opt.state), len(opt.state), tuple(
        (tuple(map(id, group["params"])), tuple(p.dtype for p in group["params"]),
         tuple(p.device for p in group["params"]), group.get("state_dtype")) for group in opt.param_groups))


def _check_group(opt: StructureOwner, index: int, group: Mapping[str, Any]) -> None:
    where = f"param_groups[{index}]"
    options = [name for name in OPTIMIZER_OPTIONS if name in group]
    if options:
        raise ValueError(f"{where} sets {', '.join(map(repr, options))}, an option of the optimizer, not of a group "
                         f"(a group does not read it): set opt.{options[0]} instead; nothing changed")
    key = group_key(index)
    group_state = opt.state[key] if key in opt.state else {}
    params = group["params"]
    if group["granularity"] == "global":
        layered = [i for i, p in enumerate(params) if p in opt.state and opt.state[p]]
        if layered:
            raise ValueError(f"{where} has granularity='global', but its filter holds per-layer state (parameter "
                             f"{layered[0]} and {len(layered) - 1} more) from granularity='layer': the per-layer "
                             "memory does not convert into one global filter's. Set the granularity back, or build "
                             "a new optimizer for granularity='global'; nothing changed")
        state = group_state.get("global") if isinstance(group_state, Mapping) else None
        if state:
            numel = sum(_local(p).numel() for p in params)
            factors = {e.name for e in state_table(opt.filter).factors}  # (sized by the layer's rows or columns)
            for name, value in state.items():
                if isinstance(value, Tensor) and value.dim() == 1 and value.numel() != numel and name not in factors:
                    raise ValueError(f"{where}: the parameters of its global filter changed ({numel} elements now, "
                                     f"{value.numel()} in its state {name!r}); the global state does not follow "
                                     "another set of parameters: build a new optimizer; nothing changed")
    elif isinstance(group_state, Mapping) and "global" in group_state:
        raise ValueError(f"{where} has granularity='layer', but its filter holds the state of one global filter "
                         "from granularity='global': it does not split into per-layer filters. Set the "
                         "granularity back, or build a new optimizer for granularity='layer'; nothing changed")


def _local(p: Tensor) -> Tensor:
    return local_tensor(p)


def _moved(value: Any, dtype: torch.dtype, device: torch.device, vectors: tuple[str, ...] = (),
           vector_dtype: torch.dtype | None = None) -> Any:
    """``value`` with its floating tensors in ``dtype`` on ``device`` (the same objects where they are already);
    the entries of a dict named in ``vectors`` in ``vector_dtype``."""
    if isinstance(value, Tensor):
        if value.device != device or (value.is_floating_point() and value.dtype != dtype):
            return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        return value
    if isinstance(value, dict):
        for k, v in list(value.items()):
            wanted = vector_dtype if k in vectors and vector_dtype is not None and isinstance(v, Tensor) else dtype
            moved = _moved(v, wanted, device, vectors, vector_dtype)
            if moved is not v:
                value[k] = moved
    return value


def _follow_parameters(opt: StructureOwner, index: int, group: Mapping[str, Any]) -> None:
    """The state of the group in the precision and on the device its parameters have now."""
    params = group["params"]
    if not params:
        return
    option = group.get("state_dtype")
    vectors = state_table(opt.filter).stored_vector_keys
    for p in params:
        if p in opt.state and opt.state[p]:
            _moved(opt.state[p], state_dtype(p.dtype), _local(p).device, vectors, vector_dtype(option, p.dtype))
    key = group_key(index)
    if key in opt.state and opt.state[key]:
        dtype = state_dtype(params[0].dtype)
        for p in params:
            dtype = torch.promote_types(dtype, state_dtype(p.dtype))
        device = _local(params[0]).device
        state = opt.state[key]
        for name, value in list(state.items()):  # (a global filter's vectors are in its nested "global" entry)
            moved = _moved(value, dtype, device, vectors if name == "global" else (), vector_dtype(option, dtype))
            if moved is not value:
                state[name] = moved
