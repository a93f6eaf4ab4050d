"""The per-layer API of a surrogate (``gain`` / ``begin_update`` / ``end_update``), as an adapter.

A surrogate written per layer (a quick prototype, run by the reference engine) returns a :class:`Gain` for
each layer from :meth:`~kalmanopt.covariance.base.CovarianceSurrogate.gain`. A contract surrogate gets that
API for free: the functions here run its declarations (reductions, coefficients, program, direction) on one
layer, so one part serves both ways of driving it; there is no second contract to keep in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.contract import CoefficientStage
from kalmanopt.program import Assign, Reduction, Vec, hp_coefficients, prepare_program, reduce_layer
from kalmanopt.state import StateTable

__all__ = ["Gain", "UpdateContext", "contract_gain", "contract_end_update", "predict_group_in_place"]


@dataclass
class Gain:
    """A layer's Kalman gain in factored form: K_i = coefficients[i] · direction.

    Attributes:
        direction: a vector of the layer's size (P̂ Hᵀ up to scale, or the raw gradient for the
            released KOALA-V).
        coefficients: one scalar per state component (θ; θ and u for momentum).
        S: the innovation variance S_ℓ = H P̂ Hᵀ + R.
        diagnostics: scalars worth logging (λ, α, w, ...), tensors.
    """

    direction: Tensor
    coefficients: Tensor
    S: Tensor
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class UpdateContext:
    """What a surrogate carries across the layers of one update.

    Attributes:
        group_state: the group's shared state (a shared P lives here).
        F: the transition matrix of the dynamics.
        Q: the diagonal of the process noise.
        per_layer: anything the surrogate collects per layer for its shared posterior.
        counters: event counts for the diagnostics (guard restarts, rows dropped, ...).
    """

    group_state: dict
    F: Tensor
    Q: Tensor
    per_layer: list = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the event counter ``name``."""
        self.counters[name] = self.counters.get(name, 0) + n


def _one_layer_batch(surrogate: Any, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor,
                     R: Tensor, hp: Mapping[str, Any]) -> tuple[CoefficientStage, dict[str, Tensor], StateTable]:
    table = surrogate.state_table()
    table.init_layer(layer_state, H.numel(), hp, H.dtype, H.device)
    env = {"H": H, "g": g}
    for e in table.vectors:  # new tensors: the per-layer API replaces the state's entries, never edits them
        env[f"state.{e.name}"] = layer_state[e.name].clone()
    reductions = (Reduction("hh", Vec("H") * Vec("H")),) + surrogate.reductions(hp)
    like = R.reshape(()).to(H)
    red = {r.name: v.reshape(1).to(like) for r, v in zip(reductions, reduce_layer(reductions, env, {}, like))}
    layer = {e.name: layer_state[e.name].reshape(1).to(like) for e in table.scalars}
    b = CoefficientStage(hp=_with_q(hp, ctx), red=red, layer=layer, group=ctx.group_state,
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


def contract_gain(surrogate: Any, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor,
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
    prepare_program(surrogate.program(b.hp), outputs).run(env, coefs)
    for e in table.vectors:
        layer_state[e.name] = env[f"state.{e.name}"]
    for name, value in b.new_layer.items():
        layer_state[name] = value.reshape(-1)[0].to(layer_state[name]).clone()
    direction = _evaluate(surrogate.direction(b.hp), env, coefs)
    return Gain(direction=direction, coefficients=torch.stack([k.reshape(-1)[0] for k in b.gain]), S=S,
                diagnostics=info)


def _evaluate(expr: Any, env: dict[str, Tensor], coefs: Mapping[str, Any]) -> Tensor:
    program = prepare_program([_assign("direction", expr)], ())
    program.run(env, coefs)
    return env["direction"]


def _assign(name: str, expr: Any) -> Assign:
    return Assign(Vec(name), expr)


def contract_end_update(surrogate: Any, ctx: UpdateContext, group_state: dict,
                        hp: Mapping[str, Any]) -> None:
    """A contract surrogate's shared posterior, from every layer :func:`contract_gain` saw."""
    reds = ctx.per_layer
    red = {k: torch.cat([r[k] for r in reds]) for k in reds[0]}
    R = red.pop("_R")[0]
    like = red["hh"][0]
    n = red["hh"].numel()
    device = like.device
    b = CoefficientStage(hp=_with_q(hp, ctx), red=red, layer={}, group=group_state,
                         numel=torch.ones(n, dtype=torch.int64, device=device), loss=like, statistic=None,
                         ok=torch.ones((), dtype=torch.bool, device=device),
                         skip=torch.zeros(n, dtype=torch.bool, device=device))
    b.R = R
    surrogate.coefficients(b)
    for name, value in b.new_group.items():
        group_state[name].copy_(value)


def predict_group_in_place(surrogate: Any, group_state: dict, F: Tensor, Q: Tensor,
                           hp: Mapping[str, Any]) -> None:
    """A contract surrogate's P̂ = F P Fᵀ + Q, written into ``group_state``."""
    like = F.new_zeros(())
    b = CoefficientStage(hp=hp, red={}, layer={}, group=group_state,
                         numel=torch.zeros(0, dtype=torch.int64, device=F.device),
                         loss=like, statistic=None, ok=torch.ones((), dtype=torch.bool, device=F.device),
                         skip=torch.zeros(0, dtype=torch.bool, device=F.device))
    surrogate.predict_group(b, F, Q)
    for name, value in b.new_group.items():
        group_state[name].copy_(value)

