"""The part contract of the two-pass step: what a part declares so that every engine can run it.

A step of a Kalman optimizer, per parameter group, is (see docs/design.md):

1. **reductions**: one pass over each layer's vectors computing per-layer sums (dot products);
2. **coefficients**: from those few numbers, per-layer scalars for all layers at once (tensors of
   shape ``[layers]``, no Python loop over layers, no host synchronisation), the new per-layer
   scalars (S_k) and group state (a shared P, R_k), and which layers to skip;
3. **element-wise program**: one pass over each layer's vectors applying short programs
   (:mod:`kalmanopt.program`) with those coefficients.

Each part (measurement model, dynamics, covariance surrogate) declares, once, in its own file:
``state_table`` (:mod:`kalmanopt.state`), ``reductions``, ``coefficients`` (a batched function of a
:class:`Batch`) and ``program``. Engines (``reference``, ``foreach``, ``fused``) execute the
declaration without knowing which part it is. Between passes 1 and 2 the per-layer sums are the only
thing a sharded layer would need to all-reduce.

Compositions of parts run on the fast engines when every part meets the contract
(:func:`contract_gap` says what is missing otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from kalmanopt.program import Assign, Reduction, State, Vec, coefficients_read
from kalmanopt.state import StateTable

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.composition import Composition

__all__ = ["Batch", "UpdatePlan", "PredictPlan", "update_plan", "predict_plan", "contract_gap",
           "run_update_coefficients", "run_predict_coefficients", "NONFINITE", "STEP_COEFFICIENT",
           "CODE_LOSS", "CODE_STATISTIC", "CODE_GRADIENT", "CODE_NEGATIVE_LOSS", "CODE_OVERFLOW",
           "CODE_STEP_OVERFLOW", "CODE_SCALER", "CODE_SKIPS", "finite_steps"]

#: the reduction every update computes: Σ g·0, NaN exactly when a gradient entry is not finite
NONFINITE = Reduction("nonfinite", Vec("g") * 0.0)

#: the coefficient column ``step{i}`` = η_k L_ℓ K_i: the correction of state component i along the gain direction
STEP_COEFFICIENT = "step{}"

#: bits of a step's code: the first three skip the step, the next three are reported only
CODE_LOSS, CODE_STATISTIC, CODE_GRADIENT, CODE_NEGATIVE_LOSS, CODE_OVERFLOW, CODE_STEP_OVERFLOW = (1, 2, 4, 8, 16, 32)
#: a loss scaler (``torch.amp.GradScaler``) found an overflow: the step is skipped, as the scaler itself
#: would skip it, and neither counted as non-finite input nor warned about (the scaler backs off)
CODE_SCALER = 64
#: the bits that skip a step
CODE_SKIPS = CODE_LOSS | CODE_STATISTIC | CODE_GRADIENT | CODE_SCALER


@dataclass
class Batch:
    """What the batched coefficient functions see and fill, for all layers of one group at once.

    Inputs (tensors of shape ``[layers]`` unless said otherwise):

    Attributes:
        hp: the group's hyper-parameters (Python values).
        red: the per-layer sums, by reduction name.
        layer: the per-layer scalar state (e.g. ``S``), current values.
        group: the group state (e.g. ``R``, a shared ``P``), current values (not to be changed in place).
        numel: the number of elements of each layer.
        loss: L_k (0-d); ``statistic``: s_k (0-d) or None.
        ok: whether the step's inputs are finite (0-d bool); a step that is not ok changes nothing.
        skip: layers that do not update (OR into it).
        diagnostics: whether per-layer diagnostics are wanted.
        lr: η_k as a 0-d tensor (a replayed CUDA graph reads it there), or None for ``hp["lr"]``.

    Outputs the parts fill:

    Attributes:
        coef: coefficient columns the programs read, by name (``[layers]`` or 0-d, broadcast).
        new_layer: new per-layer scalar state (applied where a layer is not skipped).
        new_group: new group state (applied where the step is ok).
        gain: the gain's coefficient per state component (K_i = gain[i] · direction).
        S: the innovation variance S_ℓ (for diagnostics).
        counters: event counts of the step (0-d integer tensors), added where the step is ok.
        info: per-layer diagnostics (λ, α, ...), by name.
        code: the step's code (0-d int32): which input was not finite, what is reported.
    """

    hp: Mapping[str, Any]
    red: dict[str, Tensor]
    layer: dict[str, Tensor]
    group: dict[str, Tensor]
    numel: Tensor
    loss: Tensor
    statistic: Tensor | None
    ok: Tensor
    skip: Tensor
    diagnostics: bool = False
    coef: dict[str, Tensor] = field(default_factory=dict)
    new_layer: dict[str, Tensor] = field(default_factory=dict)
    new_group: dict[str, Tensor] = field(default_factory=dict)
    gain: list[Tensor] = field(default_factory=list)
    S: Tensor | None = None
    L: Tensor | None = None
    R: Tensor | None = None
    counters: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Tensor] = field(default_factory=dict)
    code: Tensor | None = None
    lr: Tensor | None = None

    @property
    def eta(self) -> Tensor | float:
        """η_k, the learning rate: ``lr`` when the driver passes it as a tensor (a replayed CUDA graph
        reads it there), else the group's ``lr``. Parts read η here, never as ``hp["lr"]``."""
        return self.lr if self.lr is not None else float(self.hp["lr"])

    @property
    def like(self) -> Tensor:
        """A 0-d tensor of the state's dtype and device."""
        return self.loss

    def count(self, name: str, n: Tensor) -> None:
        """Add the device count ``n`` to the counter ``name``."""
        n = n.to(torch.int64)
        self.counters[name] = self.counters[name] + n if name in self.counters else n

    def group_value(self, name: str) -> Tensor:
        """The newest value of group state ``name`` (this step's if a part already set it)."""
        return self.new_group.get(name, self.group[name])


def contract_gap(composition: Composition) -> str | None:
    """``None`` if every part of the composition meets the two-pass contract, else what is missing."""
    for kind, part in (("measurement", composition.measurement), ("dynamics", composition.dynamics),
                       ("surrogate", composition.surrogate)):
        gap = getattr(part, "contract_gap", None)
        reason = gap() if gap is not None else "it does not declare the two-pass contract"
        if reason is not None:
            return f"the {kind} {type(part).__name__} does not meet the two-pass contract: {reason}"
    return _ride_gap(composition)


#: the verdicts of :func:`_ride_gap`, by id of the composition (with it and its dynamics, to check identity):
#: engines ask for the contract on every step
_RIDE_GAPS: dict[int, tuple[Any, Any, str | None]] = {}


def _ride_gap(composition: Composition) -> str | None:
    """What keeps a dynamics that declares ``predict_rides_on_update`` from riding, or None."""
    d = composition.dynamics
    if not getattr(d, "predict_rides_on_update", False):
        return None
    hit = _RIDE_GAPS.get(id(composition))
    if hit is not None and hit[0] is composition and hit[1] is d:
        return hit[2]
    if len(_RIDE_GAPS) > 256:
        _RIDE_GAPS.clear()
    gap = _find_ride_gap(composition, d)
    _RIDE_GAPS[id(composition)] = (composition, d, gap)
    return gap


def _find_ride_gap(composition: Composition, d: Any) -> str | None:
    specs = composition.hyperparameters()
    hp = {name: spec.default for name, spec in specs.items()}
    program = tuple(d.predict_program(hp))
    read = coefficients_read(a.expr for a in program)
    missing = [name for name in read if name not in specs]
    if missing:
        return (f"the dynamics {type(d).__name__} declares predict_rides_on_update, but its predict program reads "
                f"the coefficient column(s) {', '.join(map(repr, missing))}, which are not hyper-parameters (a "
                f"riding program runs before predict_coefficients; valid: {sorted(specs)})")
    if not program:
        return (f"the dynamics {type(d).__name__} declares predict_rides_on_update, but its predict has no "
                "element-wise program to ride")
    return None


@dataclass(frozen=True)
class UpdatePlan:
    """The declaration of one update for a composition and a group's structural options."""

    table: StateTable
    reductions: tuple[Reduction, ...]
    pre: tuple[Assign, ...]          # the measurement's vectors (H)
    program: tuple[Assign, ...]      # the surrogate's and the dynamics' correction
    outputs: tuple[str, ...]         # env keys written back (state vectors, theta)
    n_gain: int

    @property
    def full_program(self) -> tuple[Assign, ...]:
        """The pre-program and the program, as one element-wise pass runs them."""
        return self.pre + self.program


@dataclass(frozen=True)
class PredictPlan:
    """The declaration of one predict: its reductions and element-wise program (both may be empty)."""

    table: StateTable
    reductions: tuple[Reduction, ...]
    program: tuple[Assign, ...]
    outputs: tuple[str, ...]
    #: whether the program may run in the update's element-wise pass (``Dynamics.predict_rides_on_update``)
    rides: bool = False

    @property
    def moves(self) -> bool:
        """Whether the predict has an element-wise pass."""
        return bool(self.program or self.reductions)


def _outputs(program: tuple[Assign, ...]) -> tuple[str, ...]:
    keys: dict[str, None] = {}
    for a in program:
        if isinstance(a.target, State) or a.target.name == "theta":
            keys.setdefault(a.target.key)
    return tuple(keys)


def state_table(composition: Composition) -> StateTable:
    """The state of the whole composition (measurement, dynamics, surrogate)."""
    return (composition.measurement.state_table() + composition.dynamics.state_table()
            + composition.surrogate.state_table())


def update_plan(composition: Composition, hp: Mapping[str, Any], diagnostics: bool = False) -> UpdatePlan:
    """The reductions and programs of an update (contract parts only)."""
    m, d, s = composition.measurement, composition.dynamics, composition.surrogate
    reductions = m.reductions(hp) + s.reductions(hp, diagnostics) + (NONFINITE,)
    pre = tuple(m.program(hp))
    n_gain = d.state_dim
    steps = [STEP_COEFFICIENT.format(i) for i in range(n_gain)]
    program = tuple(s.program(hp)) + tuple(d.correction(s.direction(hp), steps, hp))
    return UpdatePlan(state_table(composition), reductions, pre, program, _outputs(program), n_gain)


def predict_plan(composition: Composition, hp: Mapping[str, Any]) -> PredictPlan:
    """The reductions and program of a predict (the dynamics' move)."""
    d = composition.dynamics
    program = tuple(d.predict_program(hp))
    return PredictPlan(state_table(composition), tuple(d.predict_reductions(hp)), program, _outputs(program),
                       rides=bool(program) and getattr(d, "predict_rides_on_update", False))


def _finite(t: Tensor) -> Tensor:
    return torch.isfinite(t).all()


def run_update_coefficients(composition: Composition, b: Batch) -> Batch:
    """Pass 2 of an update, for all layers at once: every part's batched coefficients.

    Fills ``b`` (see :class:`Batch`); the step coefficients ``step{i}`` = η_k L_ℓ K_i, 0 where a layer is
    skipped. Also sets ``b.code``. No host synchronisation.
    """
    like = b.like
    # the step's inputs: a loss, statistic or gradient that is not finite skips the step
    code = (~_finite(b.loss)).to(torch.int32) * CODE_LOSS
    if b.statistic is not None:
        code = code | (~_finite(b.statistic)).to(torch.int32) * CODE_STATISTIC
    bad = b.red["nonfinite"]
    if bad.numel():
        code = code | (~_finite(bad)).to(torch.int32) * CODE_GRADIENT
    b.ok = b.ok & ((code & CODE_SKIPS) == 0)
    b.skip = b.skip | ~b.ok
    composition.measurement.coefficients(b)
    composition.surrogate.coefficients(b)
    # the step along the gain: η_k L_ℓ K_i; with the guard the innovation is max(L_ℓ − L*, 0)
    innovation = b.L.clamp_min(0.0) if b.hp.get("guard", True) else b.L
    scale = b.eta * innovation
    steps, wild = finite_steps([scale * k for k in b.gain], b.skip)
    for i, step in enumerate(steps):
        b.coef[STEP_COEFFICIENT.format(i)] = step
    composition.dynamics.coefficients(b)
    if wild is not None:
        code = code | wild.any().to(torch.int32) * CODE_STEP_OVERFLOW * b.ok.to(torch.int32)
    info = b.counters.pop("overflow", None)
    if info is not None:
        code = code | (info > 0).to(torch.int32) * CODE_OVERFLOW * b.ok.to(torch.int32)
    below = b.counters.pop("below_target", None)  # (the measurement's: the loss below its target L*)
    if b.hp.get("guard", True):
        below = (b.loss < 0) if below is None else below > 0
        code = code | below.to(torch.int32) * CODE_NEGATIVE_LOSS * b.ok.to(torch.int32)
    b.code = code
    b.count("skipped_layers", b.skip.sum() if b.skip.numel() else like.new_zeros((), dtype=torch.int64))
    return b


def finite_steps(steps: list[Tensor], skip: Tensor) -> tuple[list[Tensor], Tensor | None]:
    """The step coefficients η_k L_ℓ K_i, 0 where a layer is skipped or any of its steps is not finite.

    A step that overflows (an R_k on its floor makes the gain 1/S_k ≈ 1e38 in float32, against a direction
    that underflowed to 0) or is NaN (∞·0) would write ∞ or NaN into θ. Such a layer does not move — a zero
    step, as for a loss below the target; its covariance still takes the posterior (every part's coefficients
    are finite there). Returns the steps and the mask of such layers among those not skipped (None when
    there are no steps).
    """
    if not steps:
        return steps, None
    wild = torch.zeros_like(skip)
    for step in steps:
        wild = wild | ~torch.isfinite(step)
    wild = wild & ~skip
    still = skip | wild
    return [torch.where(still, torch.zeros_like(step), step) for step in steps], wild


def run_predict_coefficients(composition: Composition, b: Batch) -> Batch:
    """The batched part of a predict: the dynamics' coefficients and group state, then the shared P̂."""
    d, s = composition.dynamics, composition.surrogate
    d.predict_coefficients(b)
    F, Q = d.transition(b)
    s.predict_group(b, F, Q)
    return b


