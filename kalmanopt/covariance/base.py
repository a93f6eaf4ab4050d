"""The interfaces of covariance surrogates and least-squares estimators ."""

from __future__ import annotations

from abc import ABC
from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.per_layer import (
    Gain,
    UpdateContext,
    contract_end_update,
    contract_gain,
    predict_group_in_place,
)
from kalmanopt.matrix import MatrixStage
from kalmanopt.part import Part
from kalmanopt.program import Assign, Expr, Reduction
from kalmanopt.state import StateTable

__all__ = ["Gain", "UpdateContext", "CovarianceSurrogate", "LeastSquaresEstimator"]


class CovarianceSurrogate(Part, ABC):
    """What stands for P: how it gives P̂Hᵀ and S, and how it absorbs the posterior.

    A surrogate is written one of two ways:

    - **the two-pass contract** (every built-in surrogate; runs on every engine): declare
      :meth:`state_table`, :meth:`reductions`, :meth:`coefficients`, :meth:`program` and
      :meth:`direction` (and :meth:`predict_group` for a shared P). See :mod:`kalmanopt.contract`.
    - **per layer** (quick prototypes; the reference engine only): override :meth:`gain`, and
      ``init_group_state`` / ``predict`` / ``end_update`` for a shared P.

    For a contract surrogate :meth:`gain` is provided: the contract run on one layer, so the
    per-layer API works for every surrogate.
    """

    #: the number of state components per parameter the surrogate models (see Dynamics.state_dim)
    state_dim: int = 1
    #: whether the surrogate needs a least-squares estimator
    needs_estimator: bool = False

    # ------------------------------------------------------------------ the two-pass contract
    def contract_gap(self) -> str | None:
        """``None`` if this surrogate meets the two-pass contract, else what it lacks."""
        cls = type(self)
        contract_owner = _defining_class(cls, "coefficients")
        if contract_owner is CovarianceSurrogate:
            return "it defines gain() only (declare state_table, reductions, coefficients, program, direction)"
        gain_owner = _defining_class(cls, "gain")
        if gain_owner is not CovarianceSurrogate and issubclass(gain_owner, contract_owner) \
                and gain_owner is not contract_owner:
            return (f"{gain_owner.__name__} overrides gain() below the contract of {contract_owner.__name__}, "
                    "so the contract would not compute what gain() does")
        return None

    def state_table(self) -> StateTable:
        """The surrogate's state (per-layer vectors and scalars, group tensors)."""
        return StateTable()

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        """The per-layer sums the coefficients need (``H``, ``g``, ``theta`` and state vectors)."""
        return ()

    def coefficients(self, b: Any) -> None:
        """Fill the :class:`~kalmanopt.contract.CoefficientStage` ``b`` for all layers at once: ``b.gain`` (one
        ``[layers]`` tensor per state component), ``b.S``, ``b.coef`` (the program's columns),
        ``b.new_layer`` / ``b.new_group``, skips (``b.skip |= ...``) and counters."""
        raise NotImplementedError(f"{type(self).__name__} does not declare the two-pass contract")

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        """The element-wise update of the surrogate's vectors (run before the correction of θ)."""
        return []

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        """The gain's direction as an expression (K_i = gain_i · direction), read after :meth:`program`."""
        raise NotImplementedError(f"{type(self).__name__} does not declare the two-pass contract")

    def predict_group(self, b: Any, F: Tensor, Q: Tensor) -> None:
        """P̂ = F P Fᵀ + Q for a shared P, into ``b.new_group``; default: nothing."""

    def matrix_stages(self, hp: Mapping[str, Any]) -> tuple[MatrixStage, ...]:
        """The surrogate's work on layers read as matrices (:mod:`kalmanopt.matrix`); default: none."""
        return ()

    # ------------------------------------------------------------------ the per-layer API
    def init_group_state(self, group_state: dict, hp: Mapping[str, Any], dtype: torch.dtype,
                         device: torch.device) -> None:
        """Create the shared state (default: the group entries of :meth:`state_table`)."""
        self.state_table().init_group(group_state, hp, dtype, device)

    def predict(self, group_state: dict, F: Tensor, Q: Tensor, hp: Mapping[str, Any]) -> None:
        """P̂ = F P Fᵀ + Q for a shared P, in place (default: the contract's :meth:`predict_group`)."""
        if self.contract_gap() is not None:
            return
        predict_group_in_place(self, group_state, F, Q, hp)

    def begin_update(self, group_state: dict, F: Tensor, Q: Tensor, hp: Mapping[str, Any]) -> UpdateContext:
        """Start an update over the layers of one group."""
        return UpdateContext(group_state=group_state, F=F, Q=Q)

    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        """Return the layer's gain and update its per-layer state (its posterior).

        Default: the two-pass contract run on this one layer (a shared P's posterior waits for
        :meth:`end_update`, which sees every layer).
        """
        if self.contract_gap() is not None:
            raise NotImplementedError(f"{type(self).__name__} must define gain() or the two-pass contract")
        return contract_gain(self, ctx, layer_state, H, g, R, hp)

    def end_update(self, ctx: UpdateContext, group_state: dict, hp: Mapping[str, Any]) -> None:
        """Absorb the posterior of a shared P after all layers (default: the contract's, over every layer)."""
        if self.contract_gap() is not None or not ctx.per_layer:
            return
        contract_end_update(self, ctx, group_state, hp)


def _defining_class(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose body defines ``name``."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return object


class LeastSquaresEstimator(Part):
    """Estimates H_k P_{k-2} from the rows A (H_{k-1}, H_{k-2}, ...) and products W = A P_{k-2}.

    It solves for P̃ with A P̃ = W (minimum Frobenius norm, with or without symmetry) and returns
    the coefficients (a, b) of H_k P̃ = aᵀ W + bᵀ A, never forming P̃ (n × n).

    An estimator implements what its surrogate calls: the product surrogate (KOALA++) calls
    :meth:`single_coefficients` only; the low-rank surrogate :meth:`coefficients_from_dots` and
    :meth:`admits_from_dots`; :meth:`coefficients` and :meth:`matrix` serve tests and teaching on
    small problems. Each method it leaves out raises ``NotImplementedError`` naming it.
    """

    #: whether the estimate P̃ is symmetric
    symmetric: bool = False

    def coefficients(self, A: Tensor, W: Tensor, h: Tensor, gram_inverse: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) with h P̃ = aᵀ W + bᵀ A; ``gram_inverse`` is (A Aᵀ)⁻¹ (m × m)."""
        raise NotImplementedError(f"{type(self).__name__} does not define coefficients()")

    def matrix(self, A: Tensor, W: Tensor) -> Tensor:
        """P̃ itself (n × n): for tests and teaching on small problems only."""
        raise NotImplementedError(f"{type(self).__name__} does not define matrix()")

    def admits(self, A: Tensor, W: Tensor, rtol: float) -> bool:
        """Whether the constraints A P̃ = W admit a solution of this estimator's kind."""
        return True

    def coefficients_from_dots(self, gram_inverse: Tensor, Ah: Tensor, Wh: Tensor,
                               AW: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`coefficients` from dot products, batched: (a, b) with h P̃ = aᵀ W + bᵀ A.

        ``gram_inverse`` = (A Aᵀ)⁻¹ and ``AW`` = A Wᵀ are ``[..., m, m]``, ``Ah`` = A h and ``Wh`` = W h
        ``[..., m]`` (one entry per layer in the leading dimensions). The two-pass engines need it
        (the low-rank surrogate's m-row estimate).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define coefficients_from_dots()")

    def admits_from_dots(self, AW: Tensor, rtol: float) -> Tensor:
        """:meth:`admits` from A Wᵀ (``[..., m, m]``), batched: a bool tensor ``[...]`` (default: all true)."""
        return torch.ones(AW.shape[:-2], dtype=torch.bool, device=AW.device)

    def single(self, H: Tensor, H_prev: Tensor, v_prev: Tensor) -> tuple[Tensor, Tensor]:
        """The one-row case of KOALA++: (α_k, w_k) with H_k P̃ = α_k v_{k-1} + w_k H_{k-1}.

        Equal to :meth:`coefficients` with m = 1; computed by :meth:`single_coefficients` from dots.
        """
        return self.single_coefficients(torch.dot(H, H_prev), torch.dot(H, v_prev), torch.dot(H_prev, H_prev),
                                        torch.dot(H_prev, v_prev))

    def single_coefficients(self, hhp: Tensor, hvp: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(α_k, w_k) of the one-row case from the dots H_k·H_{k-1}, H_k·v_{k-1}, x = ‖H_{k-1}‖², y = H_{k-1}·v_{k-1}.

        Batched: any shape (one entry per layer). The two-pass engines need it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define single_coefficients()")
