"""A filter is a composition of parts: measurement model, dynamics, covariance surrogate (and,
for the product surrogates, a least-squares estimator inside the surrogate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from kalmanopt.covariance.base import CovarianceSurrogate, LeastSquaresEstimator
from kalmanopt.dynamics import Dynamics
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.measurement import MeasurementModel
from kalmanopt.plan import check_declarations, find_contract_gap

__all__ = ["Composition", "LEARNING_RATE"]

#: the learning-rate schedule η_k, read by the optimizer itself
LEARNING_RATE = HyperParameter("lr", 1.0, Range(0.0), "learning rate η multiplying every update")


@dataclass(frozen=True)
class Composition:
    """Measurement model + dynamics + covariance surrogate: everything a Kalman optimizer computes.

    Args:
        measurement: turns a minibatch into (L_ℓ, H_ℓ, R_k).
        dynamics: F, Q and the state (random walk or momentum).
        surrogate: what stands for P (it holds its least-squares estimator, if it needs one).
        name: a label for reprs, logs and tables.
        defaults: preset-specific defaults overriding the parts' own (e.g. ``{"q": 1.0}``).

    Raises:
        ValueError: if the parts do not fit together (e.g. a 2×2 block surrogate on random-walk
            dynamics), naming what fits; :class:`~kalmanopt.plan.DeclarationError` (a ``ValueError``) if
            a part's declarations do not (a reduction over a vector nobody makes, a program writing
            undeclared state, a coefficient nobody provides, a gain of the wrong length), naming the
            part and the name (:func:`~kalmanopt.plan.check_declarations`).
    """

    measurement: MeasurementModel
    dynamics: Dynamics
    surrogate: CovarianceSurrogate
    name: str = "custom"
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, part, base in (("measurement", self.measurement, MeasurementModel),
                                 ("dynamics", self.dynamics, Dynamics),
                                 ("surrogate", self.surrogate, CovarianceSurrogate)):
            if not isinstance(part, base):
                raise TypeError(f"{kind} must be a {base.__name__}, got {type(part).__name__}")
        if self.surrogate.state_dim != self.dynamics.state_dim:
            raise ValueError(
                f"surrogate {type(self.surrogate).__name__} models {self.surrogate.state_dim} state "
                f"component(s) per parameter but dynamics {type(self.dynamics).__name__} has "
                f"{self.dynamics.state_dim}; pair a 2×2 block surrogate with momentum dynamics and "
                "the others with random-walk dynamics"
            )
        unknown = set(self.defaults) - set(self.hyperparameters())
        if unknown:
            raise ValueError(f"defaults name unknown hyper-parameters {sorted(unknown)}; "
                             f"valid: {sorted(self.hyperparameters())}")
        check_declarations(self)

    @cached_property
    def contract_gap(self) -> str | None:
        """``None`` if every part meets the two-pass contract (every engine runs it), else what is missing.

        Computed once: a composition and its parts are immutable values.
        """
        return find_contract_gap(self)

    @property
    def estimator(self) -> LeastSquaresEstimator | None:
        """The least-squares estimator of a product surrogate, else ``None``."""
        return getattr(self.surrogate, "estimator", None)

    def parts(self) -> dict[str, object]:
        """The parts by kind."""
        parts: dict[str, object] = {"measurement": self.measurement, "dynamics": self.dynamics,
                                    "surrogate": self.surrogate}
        if self.estimator is not None:
            parts["estimator"] = self.estimator
        return parts

    def hyperparameters(self) -> dict[str, HyperParameter]:
        """Every hyper-parameter the composition reads, with this composition's defaults."""
        specs: dict[str, HyperParameter] = {LEARNING_RATE.name: LEARNING_RATE}
        for part in self.parts().values():
            for spec in part.hyperparameters:
                specs.setdefault(spec.name, spec)
        for name, value in self.defaults.items():
            spec = specs[name]
            specs[name] = HyperParameter(spec.name, value, spec.valid, spec.doc)
        return specs

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v!r}" for k, v in self.parts().items() if k != "estimator")
        return f"Composition({self.name!r}: {parts})"
