"""The reference engine: per layer, readable, every composition, the oracle of the fast engines.

For parts that meet the two-pass contract it is :class:`~kalmanopt.engines.torch_ops.TorchEngine`
reading every branch on the host (the skip rule, a non-finite step). For a surrogate written per
layer (``gain()``, a quick prototype) it runs the filter loop itself::

    predict:  x̂_k = F x_{k-1};  P̂_k = F P_{k-1} Fᵀ + Q
    update:   R_k, L_ℓ and the skip rule from the measurement, then per layer ℓ
                  K_ℓ = gain(H_ℓ, R_k)                        K = P̂ Hᵀ / S,  S = H P̂ Hᵀ + R
                  x_ℓ ← x_ℓ − η_k L_ℓ K_ℓ                     (the dynamics' correction, L* = 0)
              and the shared posterior P_k = (I − K H) P̂_k (``end_update``).

It also provides the per-layer API (``CovarianceSurrogate.gain``) of contract surrogates: the
contract run on one layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from kalmanopt.contract import (
    CODE_NEGATIVE_LOSS,
    CODE_OVERFLOW,
    CODE_STEP_OVERFLOW,
    STEP_COEFFICIENT,
    Batch,
    contract_gap,
    finite_steps,
)
from kalmanopt.covariance.base import CovarianceSurrogate, Gain, UpdateContext
from kalmanopt.engines.torch_ops import FlatLayer, GroupContext, TorchEngine, _Work
from kalmanopt.program import Assign, Reduction, Vec, compile_program, hp_coefficients, reduce_layer
from kalmanopt.state import StateTable

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.composition import Composition

__all__ = ["ReferenceEngine", "contract_gain", "contract_end_update", "predict_group_in_place"]


class ReferenceEngine(TorchEngine):
    """``implementation="reference"``: every composition on every device (synchronises with the host)."""

    name = "reference"
    device_step = False

    def __init__(self) -> None:
        super().__init__(host_branches=True)

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        return None

    # -------------------------------------------------------------- surrogates written per layer
    def update_coefficients(self, composition: Composition, b: Batch) -> Batch:
        if contract_gap(composition) is None:
            return super().update_coefficients(composition, b)
        # the measurement's part of the batch (R_k, L_ℓ, the skip rule); gains come per layer in apply
        composition.measurement.coefficients(b)
        b.skip = b.skip | ~b.ok
        overflow = b.counters.pop("overflow", None)
        code = torch.zeros((), dtype=torch.int32, device=b.ok.device)
        if overflow is not None:
            code = code | (overflow > 0).to(torch.int32) * CODE_OVERFLOW * b.ok.to(torch.int32)
        below = b.counters.pop("below_target", None)  # (the measurement's: the loss below its target L*)
        if b.hp.get("guard", True):
            below = (b.loss < 0) if below is None else below > 0
            code = code | below.to(torch.int32) * CODE_NEGATIVE_LOSS * b.ok.to(torch.int32)
        b.code = code
        return b

    def reduce_update(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], dict[str, Tensor], Tensor]:
        if contract_gap(ctx.composition) is None:
            return super().reduce_update(ctx)
        return self._legacy_reduce(ctx)

    def apply_update(self, work: _Work, b: Batch) -> None:
        if contract_gap(work.ctx.composition) is None:
            return super().apply_update(work, b)
        self._legacy_apply(work, b)

    def _legacy_reduce(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], dict[str, Tensor], Tensor]:
        comp, group = ctx.composition, ctx.group
        table = comp.dynamics.state_table()
        active = [layer for layer in ctx.layers if any(p.grad is not None for p in layer.params)]
        self._ensure_state(table, active, group)
        flats = [FlatLayer(layer, table) for layer in active]
        hp = hp_coefficients(group)
        like = ctx.group_state["R"]
        pre = compile_program(comp.measurement.program(group), ())
        reductions = comp.measurement.reductions(group) + (Reduction("nonfinite", Vec("g") * 0.0),)
        rows = []
        for f in flats:
            pre.run(f.env, hp)
            rows.append(torch.stack(reduce_layer(reductions, f.env, hp, like)).to(like))
        table_t = torch.stack(rows) if rows else like.new_zeros(0, len(reductions))
        red = {r.name: table_t[:, i] for i, r in enumerate(reductions)}
        numel = torch.tensor([f.layer.numel for f in flats], dtype=torch.int64, device=like.device)
        steps = [STEP_COEFFICIENT.format(i) for i in range(comp.dynamics.state_dim)]
        correction = compile_program(comp.dynamics.correction(Vec("direction"), steps, group),
                                     ["theta"] + [f"state.{e.name}" for e in table.vectors])
        return _Work(ctx, flats, correction, hp, n_none=len(ctx.layers) - len(active)), red, {}, numel

    def _legacy_apply(self, work: _Work, b: Batch) -> None:
        ctx = work.ctx
        comp, group, group_state = ctx.composition, ctx.group, ctx.group_state
        self._commit_group(group_state, b)  # R_k
        if not bool(b.ok):
            return
        R = b.R
        F, Q = comp.dynamics.transition(b)
        uctx = comp.surrogate.begin_update(group_state, F, Q, group)
        # η_k max(L_ℓ, 0) with the guard (a loss below L* = 0 does not move θ), η_k L_ℓ without
        scale = float(group["lr"]) * (b.L.clamp_min(0.0) if group.get("guard", True) else b.L)
        skipped = b.skip.tolist()
        for i, f in enumerate(work.flats):
            if skipped[i]:
                continue
            H, g = f.env["H"], f.env["g"]
            # K_ℓ = P̂ H_ℓᵀ / S_ℓ  (the surrogate also stores its per-layer posterior)
            gain = comp.surrogate.gain(uctx, f.layer.state, H, g, R.to(H), group)
            coefs: dict[str, Any] = dict(work.hp)
            # η_k L_ℓ K_i, 0 where any of them is not finite (the layer does not move; as the contract does)
            steps, wild = finite_steps([scale[i] * gain.coefficients[c] for c in range(comp.dynamics.state_dim)],
                                       b.skip[i])
            for c, step in enumerate(steps):
                coefs[STEP_COEFFICIENT.format(c)] = step
            if wild is not None and bool(wild):
                b.code = b.code | CODE_STEP_OVERFLOW
            f.env["direction"] = gain.direction
            # x_ℓ ← x_ℓ − η_k L_ℓ K_ℓ
            work.program.run(f.env, coefs)
            f.commit()
            if ctx.diagnostics:
                info = {"S": gain.S, "gain_scale": coefs[STEP_COEFFICIENT.format(0)]}
                info.update(gain.diagnostics)
                work.extra.setdefault("diagnostics", {})[i] = info
        # P_k = (I − K H) P̂_k  (for a shared P)
        comp.surrogate.end_update(uctx, group_state, group)
        for name, n in uctx.counters.items():
            if name in group_state and n:
                group_state[name].add_(n)
        group_state["skipped_layers"].add_(int(b.skip.sum()) + work.n_none)

    def apply_predict(self, work: _Work, b: Batch) -> None:
        super().apply_predict(work, b)
        surrogate = work.ctx.composition.surrogate
        if surrogate.contract_gap() is not None and bool(b.ok):
            # a shared P of a surrogate written per layer: its own predict, in place
            F, Q = work.ctx.composition.dynamics.transition(b)
            surrogate.predict(work.ctx.group_state, F, Q, work.ctx.group)


# ---------------------------------------------------------------------- the per-layer API of contract parts
def _one_layer_batch(surrogate: CovarianceSurrogate, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor,
                     R: Tensor, hp: Mapping[str, Any]) -> tuple[Batch, dict[str, Tensor], StateTable]:
    table = surrogate.state_table()
    table.init_layer(layer_state, H.numel(), hp, H.dtype, H.device)
    env = {"H": H, "g": g}
    for e in table.vectors:  # new tensors: the per-layer API replaces the state's entries, never edits them
        env[f"state.{e.name}"] = layer_state[e.name].clone()
    reductions = (Reduction("hh", Vec("H") * Vec("H")),) + surrogate.reductions(hp)
    like = R.reshape(()).to(H)
    red = {r.name: v.reshape(1).to(like) for r, v in zip(reductions, reduce_layer(reductions, env, {}, like))}
    layer = {e.name: layer_state[e.name].reshape(1).to(like) for e in table.scalars}
    b = Batch(hp=_with_q(hp, ctx), red=red, layer=layer, group=ctx.group_state,
              numel=torch.full((1,), H.numel(), dtype=torch.int64, device=H.device),
              loss=like, statistic=None, ok=torch.ones((), dtype=torch.bool, device=H.device),
              skip=torch.zeros(1, dtype=torch.bool, device=H.device))
    b.R = like
    return b, env, table


def _with_q(hp: Mapping[str, Any], ctx: UpdateContext) -> dict[str, Any]:
    """The hyper-parameters with q taken from the context's process noise (the per-layer API passes it there)."""
    out = dict(hp)
    out["q"] = float(ctx.Q[0])
    return out


def contract_gain(surrogate: CovarianceSurrogate, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor,
                  R: Tensor, hp: Mapping[str, Any]) -> Gain:
    """``surrogate.gain`` for a contract surrogate: its reductions, coefficients and program on one layer.

    A shared P's posterior is left to :func:`contract_end_update` (it needs every layer).
    """
    b, env, table = _one_layer_batch(surrogate, ctx, layer_state, H, g, R, hp)
    surrogate.coefficients(b)
    for name, n in b.counters.items():
        ctx.count(name, int(n))
    S = b.S.reshape(-1)[0] if b.S is not None else R
    info = {k: v.reshape(-1)[0] for k, v in b.info.items()}
    if bool(b.skip[0]):
        ctx.count("skipped_layers")
        return Gain(direction=torch.zeros_like(H), coefficients=H.new_zeros(len(b.gain) or 1), S=S,
                    diagnostics=info)
    ctx.per_layer.append({**b.red, "_R": b.R.reshape(1)})
    coefs: dict[str, Any] = hp_coefficients(b.hp)
    coefs.update({k: v.reshape(-1)[0] for k, v in b.coef.items()})
    outputs = [f"state.{e.name}" for e in table.vectors]
    compile_program(surrogate.program(b.hp), outputs).run(env, coefs)
    for e in table.vectors:
        layer_state[e.name] = env[f"state.{e.name}"]
    for name, value in b.new_layer.items():
        layer_state[name] = value.reshape(-1)[0].to(layer_state[name]).clone()
    direction = _evaluate(surrogate.direction(b.hp), env, coefs)
    return Gain(direction=direction, coefficients=torch.stack([k.reshape(-1)[0] for k in b.gain]), S=S,
                diagnostics=info)


def _evaluate(expr: Any, env: dict[str, Tensor], coefs: Mapping[str, Any]) -> Tensor:
    program = compile_program([_assign("direction", expr)], ())
    program.run(env, coefs)
    return env["direction"]


def _assign(name: str, expr: Any) -> Assign:
    return Assign(Vec(name), expr)


def contract_end_update(surrogate: CovarianceSurrogate, ctx: UpdateContext, group_state: dict,
                        hp: Mapping[str, Any]) -> None:
    """A contract surrogate's shared posterior, from every layer :func:`contract_gain` saw."""
    reds = ctx.per_layer
    red = {k: torch.cat([r[k] for r in reds]) for k in reds[0]}
    R = red.pop("_R")[0]
    like = red["hh"][0]
    n = red["hh"].numel()
    device = like.device
    b = Batch(hp=_with_q(hp, ctx), red=red, layer={}, group=group_state,
              numel=torch.ones(n, dtype=torch.int64, device=device), loss=like, statistic=None,
              ok=torch.ones((), dtype=torch.bool, device=device), skip=torch.zeros(n, dtype=torch.bool, device=device))
    b.R = R
    surrogate.coefficients(b)
    for name, value in b.new_group.items():
        group_state[name].copy_(value)


def predict_group_in_place(surrogate: CovarianceSurrogate, group_state: dict, F: Tensor, Q: Tensor,
                           hp: Mapping[str, Any]) -> None:
    """A contract surrogate's P̂ = F P Fᵀ + Q, written into ``group_state``."""
    like = F.new_zeros(())
    b = Batch(hp=hp, red={}, layer={}, group=group_state, numel=torch.zeros(0, dtype=torch.int64, device=F.device),
              loss=like, statistic=None, ok=torch.ones((), dtype=torch.bool, device=F.device),
              skip=torch.zeros(0, dtype=torch.bool, device=F.device))
    surrogate.predict_group(b, F, Q)
    for name, value in b.new_group.items():
        group_state[name].copy_(value)

