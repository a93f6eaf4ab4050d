"""The executor of matrix stages (:mod:`kalmanopt.matrix`), the same for every engine.

The driver calls :func:`run_before` ahead of an engine's first pass and :func:`run_after` after its
element-wise pass. Per group, the layers that have a gradient are grouped by the shape they are read as
(and their factors' shapes); each block's vectors and factors are stacked, the part's stage function runs
once per block as batched torch operations, and its workspace vectors are copied into the layers' state
vectors (where every engine reads them) and its new factors committed where the layer took the update.
Nothing here synchronises with the host; a stage's interval is counted on the host, per group, in the
optimizer's runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.contract import CoefficientStage
from kalmanopt.engines.shards import full_tensor, gather_local, is_sharded, local_part, local_tensor
from kalmanopt.layers import Layer
from kalmanopt.matrix import MatrixBlock, MatrixStage
from kalmanopt.plan import UpdatePlan, contract_gap, plan_key, update_plan
from kalmanopt.program import PreparedProgram, hp_coefficients, prepare_program, vectors_read
from kalmanopt.state import matricised_shape

__all__ = ["StagedGroup", "has_stages", "run_before", "run_after", "fixed_every_step"]


@dataclass
class _Block:
    """Layers of one group read as matrices of one shape, with their positions among the active layers."""

    m: int
    n: int
    matrix: bool
    layers: list[Layer]
    rows: list[int]
    block: MatrixBlock | None = None
    # factors set by this step's ``before`` stages (committed after the pass) and the values they replace
    pending: dict[str, Tensor] = field(default_factory=dict)
    replaced: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StagedGroup:
    """What :func:`run_before` leaves for :func:`run_after` in one step of one group."""

    plan: UpdatePlan
    blocks: list[_Block]
    pre: PreparedProgram
    hp: dict[str, float]
    counter: dict[tuple, int]
    runtime: Any
    created: list[Layer] = field(default_factory=list)
    due: dict[str, bool] = field(default_factory=dict)


def _plan(composition: Any, group: Mapping[str, Any], diagnostics: bool, runtime: Any) -> tuple[UpdatePlan,
                                                                                               PreparedProgram]:
    def make() -> tuple[UpdatePlan, PreparedProgram]:
        plan = update_plan(composition, group, diagnostics)
        return plan, prepare_program(plan.pre, ())

    return runtime.cached("plans", ("matrix", plan_key(group, diagnostics)), make)


def has_stages(composition: Any, group: Mapping[str, Any], runtime: Any) -> bool:
    """Whether the composition declares matrix stages for this group (a surrogate written per layer has none)."""
    if contract_gap(composition) is not None:
        return False
    return bool(_plan(composition, group, False, runtime)[0].stages)


def fixed_every_step(composition: Any, group: Mapping[str, Any], runtime: Any) -> bool:
    """Whether every matrix stage of the composition runs at every step (a captured CUDA graph replays the
    same work each time, so a stage with an interval keeps its group off the graph)."""
    if not has_stages(composition, group, runtime):
        return True
    return all(stage.interval(group) == 1 for stage in _plan(composition, group, False, runtime)[0].stages)


def _active(layers: Sequence[Layer]) -> list[Layer]:
    return [layer for layer in layers if any(p.grad is not None for p in layer.params)]


def _sharded(layer: Layer) -> bool:
    return any(is_sharded(p) for p in layer.params)


def _shape(layer: Layer) -> tuple[int, ...]:
    return tuple(layer.params[0].shape) if len(layer.params) == 1 else (layer.numel,)  # (a global layer: a vector)


def _blocks(plan: UpdatePlan, layers: Sequence[Layer], rows: Mapping[int, int], group: Mapping[str, Any],
            runtime: Any) -> list[_Block]:
    """The layers that take part, by shape: every layer with a gradient here, and every sharded layer (its
    stages gather it, a collective every rank must join whatever its gradients). ``rows``: a layer's position
    among the layers with a gradient (the engines' order), absent for a sharded layer without one here.

    The grouping is a function of the layers' shapes, precisions, sharding and presence, and of the
    hyper-parameters that size the factors: it is kept in the runtime by those, so that a step like the last
    one only rebuilds the (mutable) blocks from it."""
    sharded = [_sharded(layer) for layer in layers]
    sizes = tuple(group[e.max_size] for e in plan.table.factors if isinstance(e.max_size, str))
    key = ("blocks", plan.table, sizes, tuple((_shape(layer), len(layer.params), layer.dtype, s, id(layer) in rows)
                                             for layer, s in zip(layers, sharded)))
    grouping = runtime.cached("plans", key, lambda: _grouping(plan, layers, rows, group, sharded))
    return [_Block(m, n, matrix, [layers[i] for i in members], [rows.get(id(layers[i]), -1) for i in members])
            for m, n, matrix, members in grouping]


def _grouping(plan: UpdatePlan, layers: Sequence[Layer], rows: Mapping[int, int], group: Mapping[str, Any],
              sharded_layers: Sequence[bool]) -> tuple[tuple[int, int, bool, tuple[int, ...]], ...]:
    """(m, n, matrix, the layers' indices) per block, in the order the layers first appear."""
    by_key: dict[tuple, tuple[int, int, bool, list[int]]] = {}
    for index, (layer, sharded) in enumerate(zip(layers, sharded_layers)):
        if id(layer) not in rows and not sharded:
            continue
        if sharded and len(layer.params) != 1:
            raise NotImplementedError(
                f"{layer.name} is one global filter over sharded parameters; matrix stages need "
                "granularity='layer' under FSDP2")
        shape = _shape(layer)
        m, n, matrix = matricised_shape(shape)
        factors = tuple(plan.table.factor_shapes(shape, group).values())
        key = (m, n, matrix, factors, layer.dtype, sharded)
        by_key.setdefault(key, (m, n, matrix, []))[3].append(index)
    return tuple((m, n, matrix, tuple(members)) for m, n, matrix, members in by_key.values())


def _ensure(plan: UpdatePlan, layers: Sequence[Layer], group: Mapping[str, Any]) -> list[Layer]:
    """Create the missing per-layer state (vectors, scalars, factors); the layers that got new state."""
    table = plan.table
    created = []
    for layer in layers:
        p = layer.params[0]
        new = False
        if not all(k in layer.state for k in table.layer_keys):
            new = table.init_layer(layer.state, sum(local_tensor(q).numel() for q in layer.params), group,
                                   layer.dtype, p.device, layer.vector_dtype)
        new = table.init_factors(layer.state, _shape(layer), group, layer.dtype, p.device) or new
        if new:
            created.append(layer)
    return created


def _factor(plan: UpdatePlan, layer: Layer, name: str, group: Mapping[str, Any]) -> Tensor:
    """A layer's factor; a sharded layer without a gradient here (and so without state) joins with its
    initial value (its results are not committed)."""
    found = layer.state.get(name)
    if found is not None:
        return found
    entry = next(e for e in plan.table.factors if e.name == name)
    return entry.initial(_shape(layer), group, layer.dtype, layer.params[0].device)


def _stack(block: _Block, name: str, env_of: list[dict[str, Tensor]]) -> Tensor:
    return torch.stack([env[name].view(block.m, block.n) for env in env_of])


def _needed(plan: UpdatePlan, reads: set[str]) -> set[str]:
    """The vectors to read for ``reads``: with ``H``, also what the measurement program computes it from."""
    needed = set(reads)
    if "H" in needed:
        needed |= {"g"} | ({"theta"} & {v.name for v in vectors_read(a.expr for a in plan.pre)})
    return needed


def _envs(block: _Block, plan: UpdatePlan, pre: PreparedProgram, reads: set[str], hp: dict[str, float]
          ) -> list[dict[str, Tensor]]:
    """Per layer: the flat vectors the block's stages read (θ, g, H from the measurement, state vectors),
    whole: a sharded layer's are gathered from every rank (a rank without its gradient gives zeros)."""
    needed = _needed(plan, reads)
    envs = []
    for layer in block.layers:
        p = layer.params[0] if len(layer.params) == 1 else None
        sharded = p is not None and is_sharded(p)
        env: dict[str, Tensor] = {}
        if "theta" in needed:
            env["theta"] = (full_tensor(p.detach()).reshape(-1).to(layer.dtype) if p is not None
                            else layer.theta())
        if "g" in needed:
            if p is None:
                env["g"] = layer.grad()
            elif p.grad is not None:
                env["g"] = full_tensor(p.grad.detach()).reshape(-1).to(layer.dtype)
            elif sharded:  # (no gradient here: zeros, so that the gather runs on every rank alike)
                env["g"] = full_tensor(torch.zeros_like(p.detach())).reshape(-1).to(layer.dtype)
            else:
                env["g"] = torch.zeros(layer.numel, dtype=layer.dtype, device=layer.params[0].device)
        if "H" in reads:
            pre.run(env, hp, in_place=False)
        for name in reads - {"theta", "g", "H"}:
            flat = layer.state.get(name)
            if flat is None:  # (a sharded layer without a gradient here: no state; zeros, gathered alike)
                flat = torch.zeros(local_tensor(p).numel(), dtype=layer.dtype, device=p.device)
            flat = flat.to(layer.dtype)  # (a vector stored in bfloat16: the stages compute in the state's precision)
            env[name] = gather_local(flat, p) if sharded else flat
        envs.append(env)
    return envs


_COUNTER = ("matrix-stage-steps",)


def _counter(runtime: Any, index: int, group: dict[str, Any], group_state: Mapping[str, Tensor],
             device: torch.device) -> dict[tuple, int]:
    """The host count of the group's updates that a stage's interval runs on (kept in the runtime).

    On the CPU it counts the applied updates (reading whether a step was applied is free there), so a
    skipped step leaves the refresh phase as it was; on other devices every update counts (reading it
    would wait for the device). A fresh runtime (a new or loaded optimizer, a changed group) starts from
    the group's step counters, read once, so that a resumed run refreshes at the steps a straight run does.
    """
    kept = runtime.group(index, group).staging
    if _COUNTER not in kept:
        start = 0
        if "steps" in group_state:
            start = int(group_state["steps"])
            if device.type != "cpu":
                start += int(group_state["nonfinite_steps"])
        kept[_COUNTER] = start
    return kept


def run_before(composition: Any, group: dict[str, Any], group_state: Mapping[str, Tensor], layers: Sequence[Layer],
               runtime: Any, index: int, diagnostics: bool) -> StagedGroup | None:
    """The ``before`` stages of one group (ahead of the engine's first pass); what ``after`` needs, or None."""
    plan, pre = _plan(composition, group, diagnostics, runtime)
    if not plan.stages:
        return None
    active = _active(layers)
    blocks = _blocks(plan, layers, {id(layer): i for i, layer in enumerate(active)}, group, runtime)
    created = _ensure(plan, active, group)
    device = active[0].params[0].device if active else torch.device("cpu")
    counter = _counter(runtime, index, group, group_state, device)
    staged = StagedGroup(plan, blocks, pre, hp_coefficients(group), counter, runtime, created)
    calls = counter[_COUNTER]
    for stage in plan.stages:
        staged.due[stage.name] = calls % stage.interval(group) == 0
    before = [s for s in plan.stages if s.when == "before" and staged.due[s.name]]
    reads = {name for s in before for name in s.reads}
    scalars = sorted({name for s in plan.stages if staged.due[s.name] for name in s.scalars})
    for block in staged.blocks:
        mb = MatrixBlock(block.m, block.n, block.matrix, group)
        mb.buffers = {name: buf for name in plan.table.workspace_keys
                      if (buf := _joint(block, name)) is not None}
        mb.x = _read(block, staged, reads, mb.buffers)
        mb.factors = {e.name: torch.stack([_factor(plan, layer, e.name, group) for layer in block.layers])
                      for e in plan.table.factors}
        mb.scalars = {name: torch.stack([_scalar(plan, layer, name, group) for layer in block.layers])
                      for name in scalars}
        block.block = mb
        for stage in before:
            _run(stage, mb)
            _write_outputs(stage, block, mb)
            _hold_factors(plan, block, mb)
    return staged


def _scalar(plan: UpdatePlan, layer: Layer, name: str, group: Mapping[str, Any]) -> Tensor:
    """A layer's scalar state (its initial value for a sharded layer without a gradient here)."""
    found = layer.state.get(name)
    if found is not None:
        return found
    entry = next(e for e in plan.table.scalars if e.name == name)
    return torch.full((), entry.initial(group), dtype=layer.dtype, device=layer.params[0].device)


def _hold_factors(plan: UpdatePlan, block: _Block, mb: MatrixBlock) -> None:
    """Factors a ``before`` stage set: the later stages read them, and they wait to be committed after the
    element-wise pass where the layer took the update."""
    for name, new in mb.new_factors.items():
        _check_factor(plan, name, new, mb.factors.get(name))
        block.replaced.setdefault(name, mb.factors[name])
        block.pending[name] = mb.factors[name] = new.to(mb.factors[name].dtype)
    mb.new_factors = {}


def _read(block: _Block, staged: StagedGroup, reads: set[str], buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vectors ``reads`` of the block's layers as they are now, ``[b, m, n]``: a workspace vector kept as one
    block buffer is that buffer itself (no copy), the others are stacked."""
    out = {name: buffers[name] for name in reads if name in buffers}
    rest = reads - set(out)
    if rest and _plain(block):
        out.update(_stacked_env(block, staged.plan, staged.pre, rest, staged.hp))
    elif rest:
        envs = _envs(block, staged.plan, staged.pre, rest, staged.hp)
        out.update({name: _stack(block, name, envs) for name in sorted(rest)})
    return out


def _plain(block: _Block) -> bool:
    """Whether every layer of the block is one whole (unsharded) parameter with a gradient."""
    return all(len(layer.params) == 1 and layer.params[0].grad is not None and not _sharded(layer)
               for layer in block.layers)


def _stacked_env(block: _Block, plan: UpdatePlan, pre: PreparedProgram, reads: set[str], hp: dict[str, float]
                 ) -> dict[str, Tensor]:
    """:func:`_envs` then :func:`_stack` for a :func:`_plain` block, stacked first: θ and g as ``[b, m, n]``
    tensors, and the (element-wise) measurement program run once on them, not once per layer."""
    shape = (block.m, block.n)
    dtype = block.layers[0].dtype
    needed = _needed(plan, reads)
    env: dict[str, Tensor] = {}
    if "theta" in needed:
        env["theta"] = torch.stack([layer.params[0].detach().reshape(shape) for layer in block.layers]).to(dtype)
    if "g" in needed:
        env["g"] = torch.stack([layer.params[0].grad.detach().reshape(shape) for layer in block.layers]).to(dtype)
    if "H" in reads:
        pre.run(env, hp, in_place=False)
    for name in reads - {"theta", "g", "H"}:
        env[name] = torch.stack([layer.state[name].view(shape) for layer in block.layers]).to(dtype)
    return {name: env[name] for name in reads}


def _joint(block: _Block, name: str) -> Tensor | None:
    """The block's workspace vector ``name`` as one ``[b, m, n]`` buffer whose rows are the layers' state entries
    (made so the first time): a stage fills it in place and a later stage reads it without a copy. None for a
    block with a sharded layer or a layer without the entry (they copy, as every other vector)."""
    layers = block.layers
    if any(name not in layer.state or _sharded(layer) for layer in layers):
        return None
    first = layers[0].state[name]
    base = first._base
    size = block.m * block.n
    if base is not None and tuple(base.shape) == (len(layers), size) and all(
            layer.state[name]._base is base and layer.state[name].data_ptr() == base[i].data_ptr()
            for i, layer in enumerate(layers)):
        return base.view(len(layers), block.m, block.n)
    base = torch.empty((len(layers), size), dtype=first.dtype, device=first.device)
    for i, layer in enumerate(layers):
        base[i].copy_(layer.state[name])
        layer.state[name] = base[i]
    return base.view(len(layers), block.m, block.n)


def _run(stage: MatrixStage, mb: MatrixBlock) -> None:
    mb.out = {}
    stage.run(mb)
    unknown = sorted(set(mb.out) - set(stage.writes))
    if unknown:
        raise ValueError(f"the matrix stage {stage.name!r} wrote {unknown}, which it does not declare in writes "
                         f"({list(stage.writes)})")


def _write_outputs(stage: MatrixStage, block: _Block, mb: MatrixBlock) -> None:
    for name in stage.writes:
        out = mb.out.get(name)
        if out is None:
            raise ValueError(f"the matrix stage {stage.name!r} declares it writes {name!r} but did not set "
                             f"block.out[{name!r}]")
        if tuple(out.shape) != (len(block.layers), block.m, block.n):
            raise ValueError(f"the matrix stage {stage.name!r} wrote {name!r} of shape {tuple(out.shape)}; it must "
                             f"be [layers, m, n] = {(len(block.layers), block.m, block.n)}")
        if out is mb.buffers.get(name):
            continue  # (filled in place)
        pairs = [(layer.state[name], _local_part(value, layer)) for layer, value in zip(block.layers, out.unbind(0))
                 if name in layer.state]
        if pairs:  # (a layer skipped at its first update holds no state any more)
            torch._foreach_copy_([t for t, _ in pairs], [v.to(t.dtype) for t, v in pairs])


def _local_part(value: Tensor, layer: Layer) -> Tensor:
    """A stage's output for one layer (m × n) as the layer's flat local vector (its rows here, if sharded)."""
    p = layer.params[0]
    return local_part(value, p) if len(layer.params) == 1 and is_sharded(p) else value.reshape(-1)


def run_after(staged: StagedGroup | None, b: CoefficientStage) -> None:
    """The ``after`` stages of one group (after the element-wise pass): new factors where a layer took the
    update (``b.ok`` and not ``b.skip``); the block's ``carry`` is dropped."""
    if staged is None:
        return
    host = b.skip.device.type == "cpu"  # (free to read there)
    staged.counter[_COUNTER] += int(bool(b.ok)) if host else 1
    if host and staged.created:
        _forget_skipped_new_state(staged, b)
    after = [s for s in staged.plan.stages if s.when == "after" and staged.due[s.name]]
    for block in staged.blocks:
        mb = block.block
        if mb is None:
            continue
        if (after or block.pending) and block.layers:
            keep = _kept(staged, block, b)
            mb.keep = keep
            coef_names = {name for s in after for name in s.coefficients}
            dtype = block.layers[0].dtype  # (a group of mixed precisions: its coefficients in the widest)
            mb.coef = {name: _column(staged, block, b, name).to(dtype) for name in coef_names}
            mb.new_factors = {}
            for stage in after:
                mb.x = _read(block, staged, set(stage.reads), mb.buffers)  # (θ and state vectors after the update)
                _run(stage, mb)
                _write_outputs(stage, block, mb)
            _commit_factors(staged.plan, block, {**block.pending, **mb.new_factors},
                            {**mb.factors, **block.replaced}, keep)
        mb.carry.clear()
        block.block = None


def _kept(staged: StagedGroup, block: _Block, b: CoefficientStage) -> Tensor:
    """``[layers]`` bool: the block's layers that took this step's update (``b.ok``, not skipped, and with a
    gradient here)."""
    device = b.skip.device
    if all(row < 0 for row in block.rows):
        return torch.zeros(len(block.rows), dtype=torch.bool, device=device)
    rows = staged.runtime.int64([max(row, 0) for row in block.rows], device)  # (cached: no copy to wait for)
    keep = (~b.skip.index_select(0, rows)) & b.ok
    if any(row < 0 for row in block.rows):
        keep = keep & (staged.runtime.int64([int(row >= 0) for row in block.rows], device) != 0)
    return keep


def _forget_skipped_new_state(staged: StagedGroup, b: CoefficientStage) -> None:
    """As if never touched: a layer skipped at its first update keeps no state (as the engines do)."""
    skipped = set()
    flags = b.skip.tolist()
    for block in staged.blocks:
        for layer, row in zip(block.layers, block.rows):
            if row < 0 or flags[row] or not bool(b.ok):
                skipped.add(id(layer))
    keys = staged.plan.table.layer_keys + tuple(e.name for e in staged.plan.table.factors)
    forgotten = set()
    for layer in staged.created:
        if id(layer) in skipped:
            forgotten.add(id(layer))
            for key in keys:
                layer.state.pop(key, None)
    for block in staged.blocks:  # the forgotten layers leave their blocks (and the stacked tensors)
        keep = [i for i, layer in enumerate(block.layers) if id(layer) not in forgotten]
        if len(keep) == len(block.layers):
            continue
        n = len(block.layers)
        block.layers = [block.layers[i] for i in keep]
        block.rows = [block.rows[i] for i in keep]
        mb = block.block
        if mb is None:
            continue
        if not keep:
            block.block = None
            continue
        index = torch.tensor(keep, dtype=torch.int64, device=b.skip.device)

        def take(value: Any, n: int = n, index: Tensor = index) -> Any:
            return value.index_select(0, index.to(value.device)) if isinstance(value, Tensor) \
                and value.dim() > 0 and value.shape[0] == n else value

        mb.factors = {k: take(v) for k, v in mb.factors.items()}
        mb.scalars = {k: take(v) for k, v in mb.scalars.items()}
        mb.carry = {k: take(v) for k, v in mb.carry.items()}
        block.pending = {k: take(v) for k, v in block.pending.items()}
        block.replaced = {k: take(v) for k, v in block.replaced.items()}
        mb.buffers = {}  # (they hold the forgotten layers' rows too: the remaining layers' vectors are stacked)


def _column(staged: StagedGroup, block: _Block, b: CoefficientStage, name: str) -> Tensor:
    """The coefficient column ``name`` for the block's layers (1 where a layer has no row here: not committed)."""
    if name not in b.coef:
        raise KeyError(f"a matrix stage reads the coefficient {name!r}, which no part provides "
                       f"(provided: {sorted(b.coef)})")
    column = b.coef[name]
    n = len(block.rows)
    if column.dim() == 0:
        return column.expand(n)
    if all(row < 0 for row in block.rows):
        return torch.ones(n, dtype=column.dtype, device=column.device)
    rows = staged.runtime.int64([max(row, 0) for row in block.rows], column.device)
    return column.index_select(0, rows)


def _check_factor(plan: UpdatePlan, name: str, new: Tensor, old: Tensor | None) -> None:
    declared = {e.name for e in plan.table.factors}
    if name not in declared or old is None:
        raise ValueError(f"a matrix stage set the factor {name!r}, which no part declares "
                         f"(declared: {sorted(declared)})")
    if new.shape != old.shape:
        raise ValueError(f"a matrix stage set the factor {name!r} of shape {tuple(new.shape)}; it has "
                         f"{tuple(old.shape)}")


def _commit_factors(plan: UpdatePlan, block: _Block, new_factors: Mapping[str, Tensor],
                    old_factors: Mapping[str, Tensor], keep: Tensor) -> None:
    """The step's new factors where a layer took the update (and they are finite); the old ones elsewhere."""
    for name, new in new_factors.items():
        old = old_factors.get(name)
        _check_factor(plan, name, new, old)
        new = new.to(old.dtype)
        # a layer whose new factor is not finite (an overflowing gradient) keeps its factor
        finite = torch.isfinite(new).flatten(1).all(1) if new.dim() > 1 else torch.isfinite(new)
        mask = (keep & finite).reshape((-1,) + (1,) * (old.dim() - 1))
        value = torch.where(mask, new, old)
        pairs = [(layer.state[name], v) for layer, v in zip(block.layers, value.unbind(0)) if name in layer.state]
        if pairs:
            torch._foreach_copy_([t for t, _ in pairs], [v for _, v in pairs])
