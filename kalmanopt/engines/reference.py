"""The reference engine: per layer, readable, every composition, the oracle of the fast engines.

For parts that meet the two-pass contract it is :class:`~kalmanopt.engines.torch_ops.TorchEngine`
reading every branch on the host (the skip rule, a non-finite step). For a surrogate written per
layer (``gain()``, a quick prototype) it runs the filter loop itself::

    predict:  x̂_k = F x_{k-1};  P̂_k = F P_{k-1} Fᵀ + Q
    update:   R_k, L_ℓ and the skip rule from the measurement, then per layer ℓ
                  K_ℓ = gain(H_ℓ, R_k)                        K = P̂ Hᵀ / S,  S = H P̂ Hᵀ + R
                  x_ℓ ← x_ℓ − η_k L_ℓ K_ℓ                     (the dynamics' correction, L* = 0)
              and the shared posterior P_k = (I − K H) P̂_k (``end_update``).

The per-layer API of contract surrogates (``CovarianceSurrogate.gain``: the contract run on one layer)
is an adapter beside the surrogate interface, :mod:`kalmanopt.covariance.per_layer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kalmanopt.contract import (
    CODE_STEP_OVERFLOW,
    STEP_COEFFICIENT,
    CoefficientStage,
    finite_steps,
)
from kalmanopt.covariance.base import Gain
from kalmanopt.engines.torch_ops import UPDATE, GroupContext, TorchEngine, _Work, flat_layers
from kalmanopt.plan import DeclarationError, contract_gap, measurement_report
from kalmanopt.program import Reduction, Vec, hp_coefficients, prepare_program, reduce_layer

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.composition import Composition

__all__ = ["ReferenceEngine"]


class ReferenceEngine(TorchEngine):
    """``implementation="reference"``: every composition on every device (synchronises with the host)."""

    name = "reference"
    device_step = False

    def __init__(self) -> None:
        super().__init__(host_branches=True)

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        return None

    # -------------------------------------------------------------- surrogates written per layer
    def update_coefficients(self, composition: Composition, b: CoefficientStage) -> CoefficientStage:
        if contract_gap(composition) is None:
            return super().update_coefficients(composition, b)
        # the measurement's part of the batch (R_k, L_ℓ, the skip rule); gains come per layer in apply
        composition.measurement.coefficients(b)
        b.skip = b.skip | ~b.ok
        b.code = measurement_report(b)
        return b

    def reduce_update(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], dict[str, Tensor], Tensor]:
        if contract_gap(ctx.composition) is None:
            return super().reduce_update(ctx)
        return self._per_layer_reduce(ctx)

    def apply_update(self, work: _Work, b: CoefficientStage) -> None:
        if contract_gap(work.ctx.composition) is None:
            return super().apply_update(work, b)
        self._per_layer_apply(work, b)

    def _per_layer_reduce(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], dict[str, Tensor], Tensor]:
        comp, group = ctx.composition, ctx.group
        table = comp.dynamics.state_table()
        active = [layer for layer in ctx.layers if any(p.grad is not None for p in layer.params)]
        self._ensure_state(table, active, group)
        flats = flat_layers(active, table, ctx, UPDATE)
        hp = hp_coefficients(group)
        like = ctx.group_state["R"]
        pre = prepare_program(comp.measurement.program(group), ())
        reductions = comp.measurement.reductions(group) + (Reduction("nonfinite", Vec("g") * 0.0),)
        rows = []
        for f in flats:
            pre.run(f.env, hp)
            rows.append(torch.stack(reduce_layer(reductions, f.env, hp, like)).to(like))
        table_t = torch.stack(rows) if rows else like.new_zeros(0, len(reductions))
        red = {r.name: table_t[:, i] for i, r in enumerate(reductions)}
        numel = torch.tensor([f.layer.numel for f in flats], dtype=torch.int64, device=like.device)
        steps = [STEP_COEFFICIENT.format(i) for i in range(comp.dynamics.state_dim)]
        correction = prepare_program(comp.dynamics.correction(Vec("direction"), steps, group),
                                     ["theta"] + [f"state.{e.name}" for e in table.vectors])
        return _Work(ctx, flats, correction, hp, n_none=len(ctx.layers) - len(active)), red, {}, numel

    def _per_layer_apply(self, work: _Work, b: CoefficientStage) -> None:
        ctx = work.ctx
        comp, group, group_state = ctx.composition, ctx.group, ctx.group_state
        if not bool(b.ok):
            self._commit_group(group_state, b)
            return
        R = b.R
        F, Q = comp.dynamics.transition(b)
        uctx = comp.surrogate.begin_update(group_state, F, Q, group)
        # η_k max(L_ℓ, 0) with the guard (a loss below L* = 0 does not move θ), η_k L_ℓ without
        scale = float(group["lr"]) * (b.L.clamp_min(0.0) if group.get("guard", True) else b.L)
        skipped = b.skip.tolist()
        # K_ℓ = P̂ H_ℓᵀ / S_ℓ for every layer first (the surrogate also stores its per-layer posterior): a gain
        # of the wrong shape is refused before any weight, and any layer's state, changes
        kept = [dict(f.layer.state) for f in work.flats]
        gains = {}
        for i, f in enumerate(work.flats):
            if skipped[i]:
                continue
            H, g = f.env["H"], f.env["g"]
            gain = comp.surrogate.gain(uctx, f.layer.state, H, g, R.to(H), group)
            problem = _gain_problem(gain, H, comp.dynamics.state_dim)
            if problem is not None:
                for flat, saved in zip(work.flats, kept):
                    flat.layer.state.clear()
                    flat.layer.state.update(saved)
                raise DeclarationError(f"the surrogate {type(comp.surrogate).__name__}'s gain() for {f.layer.name} "
                                       f"{problem}; the step was refused and nothing changed")
            gains[i] = gain
        self._commit_group(group_state, b)  # R_k
        for i, gain in gains.items():
            f = work.flats[i]
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

    def apply_predict(self, work: _Work, b: CoefficientStage) -> None:
        super().apply_predict(work, b)
        surrogate = work.ctx.composition.surrogate
        if surrogate.contract_gap() is not None and bool(b.ok):
            # a shared P of a surrogate written per layer: its own predict, in place
            F, Q = work.ctx.composition.dynamics.transition(b)
            surrogate.predict(work.ctx.group_state, F, Q, work.ctx.group)


def _gain_problem(gain: Any, H: Tensor, state_dim: int) -> str | None:
    """What is wrong with a per-layer gain for a layer with gradient ``H``, or None."""
    if not isinstance(gain, Gain):
        return f"returned {type(gain).__name__}, not a kalmanopt.Gain"
    if not isinstance(gain.direction, Tensor) or gain.direction.shape != H.shape:
        shape = tuple(gain.direction.shape) if isinstance(gain.direction, Tensor) else type(gain.direction).__name__
        return f"made a direction of shape {shape}; it must have the layer's shape {tuple(H.shape)}"
    if not isinstance(gain.coefficients, Tensor) or gain.coefficients.numel() != state_dim:
        n = gain.coefficients.numel() if isinstance(gain.coefficients, Tensor) else "no tensor of"
        return (f"made {n} gain coefficient(s); the dynamics has {state_dim} state component(s) per parameter "
                "(one coefficient each)")
    return None
