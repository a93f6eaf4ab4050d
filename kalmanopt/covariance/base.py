"""The interfaces of covariance surrogates and least-squares estimators (:ref:`docs/design.md <design-contracts>`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.part import Part

__all__ = ["Gain", "UpdateContext", "CovarianceSurrogate", "LeastSquaresEstimator"]


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


class CovarianceSurrogate(Part, ABC):
    """What stands for P: how it gives P̂Hᵀ and S, and how it absorbs the posterior.

    The optimizer calls, once per step and parameter group: ``predict`` (in the predict phase),
    then ``begin_update``, ``gain`` for each layer that has a gradient, and ``end_update``.
    """

    #: the number of state components per parameter the surrogate models (see Dynamics.state_dim)
    state_dim: int = 1
    #: whether the surrogate needs a least-squares estimator
    needs_estimator: bool = False

    def init_group_state(self, group_state: dict, hp: Mapping[str, Any], dtype: torch.dtype,
                         device: torch.device) -> None:
        """Create the shared state (a shared P); default: none."""

    def predict(self, group_state: dict, F: Tensor, Q: Tensor, hp: Mapping[str, Any]) -> None:
        """P̂ = F P Fᵀ + Q for a shared P; default: nothing (per-layer surrogates predict in ``gain``)."""

    def begin_update(self, group_state: dict, F: Tensor, Q: Tensor, hp: Mapping[str, Any]) -> UpdateContext:
        """Start an update over the layers of one group."""
        return UpdateContext(group_state=group_state, F=F, Q=Q)

    @abstractmethod
    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        """Return the layer's gain and update its per-layer state (its posterior)."""

    def end_update(self, ctx: UpdateContext, group_state: dict, hp: Mapping[str, Any]) -> None:
        """Absorb the posterior of a shared P after all layers; default: nothing."""


class LeastSquaresEstimator(Part, ABC):
    """Estimates H_k P_{k-2} from the rows A (H_{k-1}, H_{k-2}, ...) and products W = A P_{k-2}.

    It solves for P̃ with A P̃ = W (minimum Frobenius norm, with or without symmetry) and returns
    the coefficients (a, b) of H_k P̃ = aᵀ W + bᵀ A, never forming P̃ (n × n).
    """

    #: whether the estimate P̃ is symmetric
    symmetric: bool = False

    @abstractmethod
    def coefficients(self, A: Tensor, W: Tensor, h: Tensor, gram_inverse: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) with h P̃ = aᵀ W + bᵀ A; ``gram_inverse`` is (A Aᵀ)⁻¹ (m × m)."""

    @abstractmethod
    def matrix(self, A: Tensor, W: Tensor) -> Tensor:
        """P̃ itself (n × n): for tests and teaching on small problems only."""

    def admits(self, A: Tensor, W: Tensor, rtol: float) -> bool:
        """Whether the constraints A P̃ = W admit a solution of this estimator's kind."""
        return True

    def single(self, H: Tensor, H_prev: Tensor, v_prev: Tensor) -> tuple[Tensor, Tensor]:
        """The one-row case of KOALA++: (α_k, w_k) with H_k P̃ = α_k v_{k-1} + w_k H_{k-1}.

        Uses the paper's five scalars; equal to :meth:`coefficients` with m = 1.
        """
        # x = ‖H_{k-1}‖²,  α_k = H_k·H_{k-1} / x
        x = torch.dot(H_prev, H_prev)
        alpha = torch.dot(H, H_prev) / x
        return alpha, self._single_w(H, H_prev, v_prev, x)

    @abstractmethod
    def _single_w(self, H: Tensor, H_prev: Tensor, v_prev: Tensor, x: Tensor) -> Tensor:
        """w_k of the one-row case."""
