"""The part contract: the types a part's declarations are written in, and the codes of a step.

A part (measurement model, dynamics, covariance surrogate) declares, once, in its own file: a
``state_table`` (:mod:`kalmanopt.state`), ``reductions`` and element-wise programs (``program``)
(:mod:`kalmanopt.program`), and ``coefficients``: a batched function of a :class:`CoefficientStage`, the
per-layer sums, scalars and group state of all layers of one group at once. This module holds that
:class:`CoefficientStage`, the one reduction every update makes (:data:`NONFINITE`), the name of the step
coefficients and the bits of a step's code. It knows no part, no composition and no engine:
:mod:`kalmanopt.plan` joins a composition's declarations into the plan every engine executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.program import Reduction, Vec

__all__ = ["CoefficientStage", "Batch", "NONFINITE", "STEP_COEFFICIENT", "CODE_LOSS", "CODE_STATISTIC", "CODE_GRADIENT",
           "CODE_NEGATIVE_LOSS", "CODE_OVERFLOW", "CODE_STEP_OVERFLOW", "CODE_SCALER", "CODE_SKIPS",
           "finite_steps"]

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
class CoefficientStage:
    """The coefficient stage of one group: what the parts' batched coefficient functions read and fill,
    for all layers at once (the stage between a plan's reduce and apply).

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



#: the name this class had before the step plan (deprecated; a part's ``coefficients(b)`` never names it)
Batch = CoefficientStage


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
