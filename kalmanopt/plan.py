"""The step plan: a composition's declarations joined into what every engine executes.

A step of a Kalman optimizer, per parameter group, is three stages (see docs/design.md):

1. **reduce**: one pass over each layer's vectors computing the per-layer sums the parts declare;
2. **coefficients**: from those numbers, per-layer scalars for all layers at once (pure functions of
   a :class:`~kalmanopt.contract.CoefficientStage`, no Python loop over layers, no host synchronisation);
3. **apply**: one pass over each layer's vectors running the element-wise programs.

A structured surrogate adds **matrix stages** (:mod:`kalmanopt.matrix`) around them: batched torch work on
each layer read as an m × n matrix, ahead of stage 1 (filling workspace vectors the passes read) and
after stage 3 (its factors' posterior, from this step's coefficients).

:func:`compile_plan` joins the declarations of a composition's parts into an immutable
:class:`StepPlan` (one update and one predict) for a group's structural options; engines execute it
and name no part. :func:`check_declarations` runs when a composition is built: it walks the plan and
dry-runs the coefficient functions on two tiny layers, so that a reduction over a vector nobody makes,
a program writing state nobody declared, a coefficient nobody provides or a gain of the wrong length is
refused at ``compose``, naming the part and the name, instead of failing at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Protocol

import torch
from torch import Tensor

from kalmanopt.contract import (
    CODE_GRADIENT,
    CODE_LOSS,
    CODE_NEGATIVE_LOSS,
    CODE_OVERFLOW,
    CODE_SKIPS,
    CODE_STATISTIC,
    CODE_STEP_OVERFLOW,
    NONFINITE,
    STEP_COEFFICIENT,
    CoefficientStage,
    finite_steps,
)
from kalmanopt.hyperparams import HyperParameter
from kalmanopt.matrix import MatrixBlock, MatrixStage
from kalmanopt.program import MEASUREMENT_VECTORS, Assign, Reduction, State, coefficients_read, vectors_read
from kalmanopt.state import StateTable

__all__ = ["FilterParts", "UpdatePlan", "PredictPlan", "StepPlan", "DeclarationError", "compile_plan",
           "plan_key", "update_plan", "predict_plan", "state_table", "contract_gap", "find_contract_gap",
           "check_declarations", "run_update_coefficients", "run_predict_coefficients", "measurement_report"]


class FilterParts(Protocol):
    """What the plan reads of a composition: its three parts and the hyper-parameters they declare."""

    measurement: Any
    dynamics: Any
    surrogate: Any

    def hyperparameters(self) -> dict[str, HyperParameter]: ...


class DeclarationError(ValueError):
    """A part's declarations do not fit the composition (raised by :func:`check_declarations`)."""


@dataclass(frozen=True)
class UpdatePlan:
    """The declaration of one update for a composition and a group's structural options."""

    table: StateTable
    reductions: tuple[Reduction, ...]
    pre: tuple[Assign, ...]          # the measurement's vectors (H)
    program: tuple[Assign, ...]      # the surrogate's and the dynamics' correction
    outputs: tuple[str, ...]         # env keys written back (state vectors, theta)
    n_gain: int
    stages: tuple[MatrixStage, ...] = ()  # the surrogate's matrix stages (kalmanopt.matrix), in order

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


@dataclass(frozen=True)
class StepPlan:
    """A composition compiled for one group's structural options: the stages every engine executes.

    Attributes:
        key: the structural options it was compiled for (:func:`plan_key`).
        table: the state of the whole composition.
        update: reductions, the measurement's pre-program and the correction program of an update.
        predict: reductions and program of a predict.
    """

    key: tuple
    table: StateTable
    update: UpdatePlan
    predict: PredictPlan


def plan_key(group: Mapping[str, Any], diagnostics: bool) -> tuple:
    """The options of a group that change the declarations (everything else is a coefficient's value).

    Weight decay zero or not (the measurement drops its terms), diagnostics, the guard, and an online R.
    """
    return (float(group["weight_decay"]) == 0.0 if "weight_decay" in group else None, bool(diagnostics),
            bool(group.get("guard", True)), group.get("r") is None)


def compile_plan(composition: FilterParts, group: Mapping[str, Any], diagnostics: bool = False) -> StepPlan:
    """The :class:`StepPlan` of ``composition`` for ``group`` (contract parts only)."""
    return StepPlan(plan_key(group, diagnostics), state_table(composition),
                    update_plan(composition, group, diagnostics), predict_plan(composition, group))


# ---------------------------------------------------------------------- verdicts
def contract_gap(composition: FilterParts) -> str | None:
    """``None`` if every part of the composition meets the two-pass contract, else what is missing.

    A :class:`~kalmanopt.composition.Composition` computes this once (its ``contract_gap`` property).
    """
    if isinstance(getattr(type(composition), "contract_gap", None), cached_property):
        return composition.contract_gap
    return find_contract_gap(composition)


def find_contract_gap(composition: FilterParts) -> str | None:
    """Compute :func:`contract_gap`: each part's own verdict, then whether a riding predict can ride."""
    for kind, part in (("measurement", composition.measurement), ("dynamics", composition.dynamics),
                       ("surrogate", composition.surrogate)):
        gap = getattr(part, "contract_gap", None)
        reason = gap() if gap is not None else "it does not declare the two-pass contract"
        if reason is not None:
            return f"the {kind} {type(part).__name__} does not meet the two-pass contract: {reason}"
    return _ride_gap(composition)


def _ride_gap(composition: FilterParts) -> str | None:
    """What keeps a dynamics that declares ``predict_rides_on_update`` from riding, or None."""
    d = composition.dynamics
    if not getattr(d, "predict_rides_on_update", False):
        return None
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


# ---------------------------------------------------------------------- the declarations joined
def _outputs(program: tuple[Assign, ...]) -> tuple[str, ...]:
    keys: dict[str, None] = {}
    for a in program:
        if isinstance(a.target, State) or a.target.name == "theta":
            keys.setdefault(a.target.key)
    return tuple(keys)


def state_table(composition: FilterParts) -> StateTable:
    """The state of the whole composition (measurement, dynamics, surrogate)."""
    return (composition.measurement.state_table() + composition.dynamics.state_table()
            + composition.surrogate.state_table())


def update_plan(composition: FilterParts, hp: Mapping[str, Any], diagnostics: bool = False) -> UpdatePlan:
    """The reductions and programs of an update (contract parts only)."""
    m, d, s = composition.measurement, composition.dynamics, composition.surrogate
    reductions = m.reductions(hp) + s.reductions(hp, diagnostics) + (NONFINITE,)
    pre = tuple(m.program(hp))
    n_gain = d.state_dim
    steps = [STEP_COEFFICIENT.format(i) for i in range(n_gain)]
    program = tuple(s.program(hp)) + tuple(d.correction(s.direction(hp), steps, hp))
    stages = tuple(s.matrix_stages(hp)) if hasattr(s, "matrix_stages") else ()
    return UpdatePlan(state_table(composition), reductions, pre, program, _outputs(program), n_gain, stages)


def predict_plan(composition: FilterParts, hp: Mapping[str, Any]) -> PredictPlan:
    """The reductions and program of a predict (the dynamics' move)."""
    d = composition.dynamics
    program = tuple(d.predict_program(hp))
    return PredictPlan(state_table(composition), tuple(d.predict_reductions(hp)), program, _outputs(program),
                       rides=bool(program) and getattr(d, "predict_rides_on_update", False))


# ---------------------------------------------------------------------- stage 2: the coefficients
def _finite(t: Tensor) -> Tensor:
    return torch.isfinite(t).all()


def run_update_coefficients(composition: FilterParts, b: CoefficientStage) -> CoefficientStage:
    """Stage 2 of an update, for all layers at once: every part's batched coefficients.

    Fills ``b`` (see :class:`~kalmanopt.contract.CoefficientStage`); the step coefficients ``step{i}`` = η_k L_ℓ K_i,
    0 where a layer is skipped. Also sets ``b.code``. No host synchronisation.
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
    b.code = code | measurement_report(b)
    b.count("skipped_layers", b.skip.sum() if b.skip.numel() else like.new_zeros((), dtype=torch.int64))
    return b


def measurement_report(b: CoefficientStage) -> Tensor:
    """The bits of a step's code the measurement reports (a 0-d int32): a layer whose ‖H‖² or loss overflowed
    (the ``overflow`` counter), a loss below the target L* (``below_target``; with the guard). Pops both
    counters; 0 where the step is not ok."""
    ok = b.ok.to(torch.int32)
    code = torch.zeros((), dtype=torch.int32, device=b.ok.device)
    overflow = b.counters.pop("overflow", None)
    if overflow is not None:
        code = code | (overflow > 0).to(torch.int32) * CODE_OVERFLOW * ok
    below = b.counters.pop("below_target", None)  # (the measurement's: the loss below its target L*)
    if b.hp.get("guard", True):
        below = (b.loss < 0) if below is None else below > 0
        code = code | below.to(torch.int32) * CODE_NEGATIVE_LOSS * ok
    return code


def run_predict_coefficients(composition: FilterParts, b: CoefficientStage) -> CoefficientStage:
    """The batched part of a predict: the dynamics' coefficients and group state, then the shared P̂."""
    d, s = composition.dynamics, composition.surrogate
    d.predict_coefficients(b)
    F, Q = d.transition(b)
    s.predict_group(b, F, Q)
    return b


# ---------------------------------------------------------------------- checks at compose
class _Declared(dict):
    """A dict of a CoefficientStage whose missing key is a :class:`DeclarationError` naming the part that asked."""

    def __init__(self, values: Mapping[str, Tensor], kind: str, reader: list[str], providers: str) -> None:
        super().__init__(values)
        self.kind, self.reader, self.providers = kind, reader, providers

    def __missing__(self, key: str) -> Any:
        raise DeclarationError(
            f"{self.reader[0]} reads the {self.kind} {key!r}, which no part of the composition provides "
            f"(provided: {', '.join(map(repr, sorted(self))) or 'none'}; {self.providers})")


def _part_name(kind: str, part: Any) -> str:
    return f"the {kind} {type(part).__name__}"


def _check_program(owner: str, program: Iterable[Assign], table: StateTable, known: set[str],
                   coefficients: set[str] | None, coefficient_source: str) -> None:
    """Walk one element-wise program: vectors read before made, state written or read undeclared, coefficients."""
    vectors = {e.name for e in table.vectors}
    for a in program:
        for v in vectors_read([a.expr]):
            if isinstance(v, State):
                if v.name not in vectors:
                    raise DeclarationError(f"{owner} reads the state vector {v.name!r}, which no part declares "
                                           f"(declared: {', '.join(map(repr, sorted(vectors))) or 'none'})")
            elif v.name not in known:
                raise DeclarationError(f"{owner} reads the vector {v.name!r} before any program makes it "
                                       f"(made so far: {', '.join(map(repr, sorted(known)))})")
        if coefficients is not None:
            for name in coefficients_read([a.expr]):
                if name not in coefficients:
                    raise DeclarationError(
                        f"{owner} reads the coefficient {name!r}, which no part provides ({coefficient_source}: "
                        f"{', '.join(map(repr, sorted(coefficients)))})")
        if isinstance(a.target, State):
            if a.target.name not in vectors:
                raise DeclarationError(f"{owner} writes the state vector {a.target.name!r}, which no part declares "
                                       "in its state table (declared: "
                                       f"{', '.join(map(repr, sorted(vectors))) or 'none'}); add a VectorState to the "
                                       "part's state_table()")
        else:
            known.add(a.target.name)


def _check_reductions(owner_of: Mapping[str, str], reductions: Iterable[Reduction], table: StateTable,
                      known: set[str]) -> None:
    vectors = {e.name for e in table.vectors}
    for r in reductions:
        owner = owner_of.get(r.name, "the composition")
        for v in vectors_read([r.expr]):
            if isinstance(v, State):
                if v.name not in vectors:
                    raise DeclarationError(f"{owner}'s reduction {r.name!r} sums over the state vector {v.name!r}, "
                                           "which no part declares (declared: "
                                           f"{', '.join(map(repr, sorted(vectors))) or 'none'})")
            elif v.name not in known:
                raise DeclarationError(f"{owner}'s reduction {r.name!r} sums over the vector {v.name!r}, which no "
                                       f"part makes (vectors: {', '.join(map(repr, sorted(known)))}; a state "
                                       "vector is State(name), not Vec(name))")


def _dry_batch(composition: FilterParts, plan: UpdatePlan | PredictPlan, hp: Mapping[str, Any], layers: int,
               diagnostics: bool, reader: list[str], update: bool) -> CoefficientStage:
    """A CoefficientStage of ``layers`` tiny layers in float64 on the CPU, its dicts answering missing keys clearly."""
    like = torch.ones((), dtype=torch.float64)
    table = plan.table
    group_state: dict[str, Tensor] = {}
    table.init_group(group_state, hp, like.dtype, like.device)
    layer_state: dict[str, Tensor] = {}
    for e in table.scalars:
        layer_state[e.name] = torch.full((layers,), float(hp[e.init]) if isinstance(e.init, str) else float(e.init),
                                         dtype=like.dtype)
    red = {r.name: torch.linspace(1.0, 2.0, layers, dtype=like.dtype) for r in plan.reductions}
    b = CoefficientStage(hp=hp,
                         red=_Declared(red, "per-layer sum", reader, "a per-layer sum is declared as a Reduction"),
                         layer=_Declared(layer_state, "per-layer scalar state", reader, "declare a ScalarState"),
                         group=_Declared(group_state, "group state", reader, "declare a GroupState"),
                         numel=torch.full((layers,), 4, dtype=torch.int64), loss=like * 0.5,
                         statistic=like * 0.5 if update else None, ok=torch.ones((), dtype=torch.bool),
                         skip=torch.zeros(layers, dtype=torch.bool), diagnostics=diagnostics)
    return b


def check_declarations(composition: FilterParts) -> None:
    """Refuse a composition whose parts' declarations do not fit, naming the part and the name.

    Checked, for an update and a predict at the hyper-parameters' defaults (with and without weight decay
    and diagnostics): every vector a reduction or program reads is made before it (``theta``, ``g``, the
    measurement's ``H``, a program's temporaries) or is a declared state vector; every state a program
    writes is declared; every coefficient a program reads is a hyper-parameter or is provided by a part's
    coefficients; the parts' coefficients read only declared sums, scalars and group state; the gain has
    one ``[layers]`` entry per state component of the dynamics. Contract parts only (a surrogate written per
    layer is checked the first time its gain is made).

    Raises:
        DeclarationError: (a ``ValueError``) what is wrong, whose it is, and what is available.
    """
    if find_contract_gap(composition) is not None:
        return
    m, d, s = composition.measurement, composition.dynamics, composition.surrogate
    specs = composition.hyperparameters()
    base = {name: spec.default for name, spec in specs.items()}
    hp_names = set(base)
    for weight_decay in (0.0, 0.1) if "weight_decay" in base else (None,):
        for diagnostics in (False, True):
            hp = dict(base, guard=True)
            if weight_decay is not None:
                hp["weight_decay"] = weight_decay
            _check_update(composition, m, d, s, hp, hp_names, diagnostics)
    _check_predict(composition, d, dict(base, guard=True), hp_names)


def _check_update(composition: FilterParts, m: Any, d: Any, s: Any, hp: dict[str, Any], hp_names: set[str],
                  diagnostics: bool) -> None:
    plan = update_plan(composition, hp, diagnostics)
    owner_of = {r.name: _part_name("measurement", m) for r in m.reductions(hp)}
    owner_of.update({r.name: _part_name("surrogate", s) for r in s.reductions(hp, diagnostics)})
    # pass 1: the measurement's pre-program makes H; the reductions read it
    known = set(MEASUREMENT_VECTORS) - {"H"}
    _check_program(_part_name("measurement", m) + "'s program", plan.pre, plan.table, known, None, "")
    _check_reductions(owner_of, plan.reductions, plan.table, set(known))
    # stage 2: each part's coefficients on two dry layers
    reader = [""]
    b = _dry_batch(composition, plan, hp, 2, diagnostics, reader, update=True)
    for kind, part, call in (("measurement", m, m.coefficients), ("surrogate", s, s.coefficients)):
        reader[0] = f"{_part_name(kind, part)}'s coefficients"
        call(b)
    if len(b.gain) != d.state_dim:
        raise DeclarationError(
            f"{_part_name('surrogate', s)}'s coefficients made a gain of {len(b.gain)} component(s), but the "
            f"dynamics {type(d).__name__} has {d.state_dim} state component(s) per parameter: b.gain needs one "
            "[layers] tensor per component")
    for i, k in enumerate(b.gain):
        if not isinstance(k, (Tensor, float, int)) or (isinstance(k, Tensor)
                                                        and tuple(k.shape) not in ((), (1,), (2,))):
            shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise DeclarationError(f"{_part_name('surrogate', s)}'s gain component {i} has shape {shape}; "
                                   "it must be one value per layer ([layers]) or one for all (0-d)")
    if b.L is None or b.R is None:
        raise DeclarationError(f"{_part_name('measurement', m)}'s coefficients must set b.L (the layers' losses) "
                               "and b.R (the measurement noise)")
    for i in range(d.state_dim):
        b.coef[STEP_COEFFICIENT.format(i)] = b.gain[i] * b.L
    reader[0] = f"{_part_name('dynamics', d)}'s coefficients"
    d.coefficients(b)
    table = plan.table
    for kind, made, declared in (("per-layer scalar state", b.new_layer, {e.name for e in table.scalars}),
                                 ("group state", b.new_group, {e.name for e in table.group})):
        unknown = sorted(set(made) - declared)
        if unknown:
            raise DeclarationError(f"a part's coefficients write the {kind} {', '.join(map(repr, unknown))}, which "
                                   f"no part declares (declared: {', '.join(map(repr, sorted(declared))) or 'none'})")
    provided = hp_names | set(b.coef)
    known = set(MEASUREMENT_VECTORS)
    for a in plan.pre:
        known.add(a.target.name)
    _check_program(f"{_part_name('surrogate', s)}'s or {_part_name('dynamics', d)}'s update program", plan.program,
                   table, known, provided, "hyper-parameters and the coefficients the parts make")
    if plan.stages:
        _check_stages(_part_name("surrogate", s), plan, hp, set(b.coef))


def _check_stages(owner: str, plan: UpdatePlan, hp: Mapping[str, Any], coefficients: set[str]) -> None:
    """The matrix stages' reads, writes, factors and coefficients declared, then a dry run on two tiny blocks
    (a 3 × 2 matrix and a column that is not one), their outputs' shapes checked."""
    table = plan.table
    vectors = {e.name for e in table.vectors}
    factors = {e.name for e in table.factors}
    provided = coefficients | set(hp)
    for stage in plan.stages:
        where = f"{owner}'s matrix stage {stage.name!r}"
        for name in stage.reads:
            if name not in (*MEASUREMENT_VECTORS, *vectors):
                raise DeclarationError(f"{where} reads the vector {name!r}, which is neither a measurement vector "
                                       f"({', '.join(MEASUREMENT_VECTORS)}) nor a declared state vector (declared: "
                                       f"{', '.join(map(repr, sorted(vectors))) or 'none'})")
        for name in stage.writes:
            if name not in vectors:
                raise DeclarationError(f"{where} writes the vector {name!r}, which no part declares (add "
                                       f"VectorState({name!r}, workspace=True) to the part's state_table())")
        for name in stage.factors:
            if name not in factors:
                raise DeclarationError(f"{where} reads the factor {name!r}, which no part declares (declared: "
                                       f"{', '.join(map(repr, sorted(factors))) or 'none'}; add a FactorState)")
        scalars = {e.name for e in table.scalars}
        for name in stage.scalars:
            if name not in scalars:
                raise DeclarationError(f"{where} reads the scalar {name!r}, which no part declares (declared: "
                                       f"{', '.join(map(repr, sorted(scalars))) or 'none'}; add a ScalarState)")
        for name in stage.coefficients:
            if name not in provided:
                raise DeclarationError(f"{where} reads the coefficient {name!r}, which no part provides (the "
                                       f"coefficients the parts make: {', '.join(map(repr, sorted(coefficients)))})")
        stage.interval(hp)
    for shape in ((3, 2), (4,)):
        _dry_stages(owner, plan, hp, shape)


def _dry_stages(owner: str, plan: UpdatePlan, hp: Mapping[str, Any], shape: tuple[int, ...]) -> None:
    m, n = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)
    layers = 2
    like = torch.ones((), dtype=torch.float64)
    block = MatrixBlock(m, n, len(shape) == 2, hp)
    reads = {name for stage in plan.stages for name in stage.reads}
    block.x = {name: torch.linspace(0.5, 1.5, layers * m * n, dtype=like.dtype).reshape(layers, m, n)
               for name in reads}
    block.factors = {e.name: torch.stack([e.initial(shape, hp, like.dtype, like.device)] * layers)
                     for e in plan.table.factors}
    block.scalars = {e.name: torch.full((layers,), e.initial(hp), dtype=like.dtype) for e in plan.table.scalars}
    block.keep = torch.ones(layers, dtype=torch.bool)
    block.coef = {name: torch.full((layers,), 2.0, dtype=like.dtype) for stage in plan.stages
                  for name in stage.coefficients}
    for stage in [s for s in plan.stages if s.when == "before"] + [s for s in plan.stages if s.when == "after"]:
        where = f"{owner}'s matrix stage {stage.name!r} (dry run on {layers} layers of shape {shape})"
        block.out = {}
        stage.run(block)
        for name in stage.writes:
            out = block.out.get(name)
            if not isinstance(out, Tensor) or tuple(out.shape) != (layers, m, n):
                got = tuple(out.shape) if isinstance(out, Tensor) else "nothing"
                raise DeclarationError(f"{where} made {name!r} of shape {got}; it must be [layers, m, n] = "
                                       f"{(layers, m, n)}")
        for name, new in block.new_factors.items():
            old = block.factors.get(name)
            if old is None or not isinstance(new, Tensor) or new.shape != old.shape:
                want = tuple(old.shape) if old is not None else "a declared factor"
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise DeclarationError(f"{where} set the factor {name!r} of shape {got}; it must be {want}")
        block.factors.update(block.new_factors)  # (a later stage reads them)
        block.new_factors = {}


def _check_predict(composition: FilterParts, d: Any, hp: dict[str, Any], hp_names: set[str]) -> None:
    plan = predict_plan(composition, hp)
    known = set(MEASUREMENT_VECTORS) - {"H", "g"}
    _check_reductions({r.name: _part_name("dynamics", d) for r in plan.reductions}, plan.reductions, plan.table,
                      set(known))
    reader = [f"{_part_name('dynamics', d)}'s predict coefficients"]
    b = _dry_batch(composition, plan, hp, 2, False, reader, update=False)
    run_predict_coefficients(composition, b)
    _check_program(f"{_part_name('dynamics', d)}'s predict program", plan.program, plan.table, known,
                   hp_names | set(b.coef), "hyper-parameters and the coefficients of predict_coefficients")
