"""Dynamics: the transition F, the process noise Q, and what the filter's state holds.

Random walk: the state is θ, F = I, Q = q I. Momentum (KOALA-M): the state is (θ, u) with u a
velocity, F = [[1, 1], [0, a]], and Q = diag(q_w, q_v) with q_w adapted online from how far the
weights move from their running average .
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.part import Part
from kalmanopt.program import Assign, Coef, Expr, Reduction, State, Vec
from kalmanopt.state import GroupState, StateTable, VectorState

__all__ = ["Dynamics", "RandomWalk", "Momentum"]


class Dynamics(Part, ABC):
    """How the hidden state evolves between measurements, and how a gain corrects it.

    Two-pass contract (see :mod:`kalmanopt.contract`): :meth:`state_table`, :meth:`transition`,
    :meth:`correction` (the element-wise update of θ and any velocities along the gain direction),
    and for dynamics that move the state in the predict, :meth:`predict_reductions`,
    :meth:`predict_coefficients` and :meth:`predict_program`.
    """

    #: the number of state components per parameter (θ alone: 1; θ and u: 2)
    state_dim: int = 1
    #: whether the predict moves the parameters (the step API then leaves θ̂_{k+1} in them)
    moves_parameters: bool = False
    #: whether the predict's element-wise program may ride on the update's element-wise pass when a predict
    #: follows the update at once (``step()``): true for a program whose coefficients are hyper-parameters
    #: only (it cannot wait for :meth:`predict_coefficients`, which needs the predict's reductions). An engine
    #: then sums the predict's reductions over the updated vectors and moves them in the same pass, one sweep
    #: over the parameters instead of three; the two-phase API still runs the predict on its own.
    predict_rides_on_update: bool = False

    def contract_gap(self) -> str | None:
        """``None``: every dynamics meets the contract (its methods have working defaults)."""
        return None

    def state_table(self) -> StateTable:
        """The state of the dynamics (velocities, adapted noise); default: none."""
        return StateTable()

    @abstractmethod
    def transition(self, b: Any) -> tuple[Tensor, Tensor]:
        """(F, Q): the state_dim × state_dim transition and the diagonal of the noise (0-d tensors of ``b``)."""

    def correction(self, direction: Expr, steps: Sequence[str], hp: Mapping[str, Any]) -> list[Assign]:
        """x_k = x̂_k − η L_ℓ K: the element-wise correction; ``steps[i]`` names η L_ℓ K_i's coefficient column."""
        theta = Vec("theta")
        # θ_k = θ_{k-1} − η L_ℓ K_θ
        return [Assign(theta, theta - Coef(steps[0]) * direction)]

    def coefficients(self, b: Any) -> None:
        """Coefficient columns the correction reads besides ``step{i}``; default: none."""

    def predict_reductions(self, hp: Mapping[str, Any]) -> tuple[Reduction, ...]:
        """Per-layer sums the predict needs, taken before the state moves; default: none."""
        return ()

    def predict_coefficients(self, b: Any) -> None:
        """The predict's coefficient columns and group state, for all layers at once; default: none."""

    def predict_program(self, hp: Mapping[str, Any]) -> list[Assign]:
        """x̂_k = F x_{k-1}, element-wise; default: nothing moves (F = I)."""
        return []


class RandomWalk(Dynamics):
    """F = I, Q = q I: the weights drift as a random walk between measurements."""

    hyperparameters = (
        HyperParameter("q", 0.1, Range(0.0), "process noise Q added to the covariance each step"),
    )

    def transition(self, b: Any) -> tuple[Tensor, Tensor]:
        like = b.like
        F = torch.ones((1, 1), dtype=like.dtype, device=like.device)
        Q = torch.full((1,), float(b.hp["q"]), dtype=like.dtype, device=like.device)
        return F, Q


class Momentum(Dynamics):
    """KOALA-M dynamics: state (θ, u), F = [[1, 1], [0, a]], Q = diag(q_w, q_v), q_w adaptive.

    predict:  q_w ← 0.9 q_w + 0.1 ‖(‖w̄_ℓ − θ_ℓ‖₂)_ℓ‖₂ / n_total;  θ_ℓ ← θ_ℓ + u_ℓ;  u_ℓ ← a u_ℓ
    correct:  θ_ℓ ← θ_ℓ − η L_ℓ K_θ;  u_ℓ ← u_ℓ − η L_ℓ K_u;  w̄_ℓ ← 0.9 w̄_ℓ + 0.1 θ_ℓ
    """

    state_dim = 2
    moves_parameters = True
    predict_rides_on_update = True  # (its move reads the hyper-parameter a only)
    hyperparameters = (
        HyperParameter("a", 0.9, Range(0.0, 1.0, high_open=True), "decay of the velocity, F = [[1, 1], [0, a]]"),
        HyperParameter("qw", 0.01, Range(0.0), "initial process noise of the weights (adapted online)"),
        HyperParameter("qv", 0.01, Range(0.0), "process noise of the velocities"),
    )

    def state_table(self) -> StateTable:
        return StateTable(vectors=(VectorState("u", 0.0, "the velocity u_ℓ"),
                                   VectorState("w_bar", 0.0, "the running average of the weights w̄_ℓ")),
                          group=(GroupState("qw", lambda hp: float(hp["qw"]), "the adapted process noise q_w"),))

    def transition(self, b: Any) -> tuple[Tensor, Tensor]:
        like = b.like
        one, zero = torch.ones_like(like), torch.zeros_like(like)
        # F = [[1, 1], [0, a]]  (made on the device: no host-device copy)
        F = torch.stack([torch.stack([one, one]), torch.stack([zero, one * float(b.hp["a"])])])
        Q = torch.stack([b.group_value("qw").to(like), one * float(b.hp["qv"])])
        return F, Q

    def correction(self, direction: Expr, steps: Sequence[str], hp: Mapping[str, Any]) -> list[Assign]:
        theta, u, w_bar = Vec("theta"), State("u"), State("w_bar")
        return [
            # θ_ℓ ← θ_ℓ − η L_ℓ (P₀₀ / S_ℓ) H_ℓ
            Assign(theta, theta - Coef(steps[0]) * direction),
            # u_ℓ ← u_ℓ − η L_ℓ (P₁₀ / S_ℓ) H_ℓ
            Assign(u, u - Coef(steps[1]) * direction),
            # w̄_ℓ ← 0.9 w̄_ℓ + 0.1 θ_ℓ
            Assign(w_bar, 0.9 * w_bar + 0.1 * theta),
        ]

    def predict_reductions(self, hp: Mapping[str, Any]) -> tuple[Reduction, ...]:
        # ‖w̄_ℓ − θ_ℓ‖², measured before the weights move
        diff = State("w_bar") - Vec("theta")
        return (Reduction("dist2", diff * diff),)

    def predict_coefficients(self, b: Any) -> None:
        qw = b.group_value("qw")
        n_total = b.numel.sum()
        # q_w ← 0.9 q_w + 0.1 ‖(‖w̄_ℓ − θ_ℓ‖)_ℓ‖₂ / n_total  (a group whose parameters are all empty keeps q_w, and
        # so does one whose ‖w̄_ℓ − θ_ℓ‖² overflows the state precision — weights of 1e19 in float32 — rather
        # than making P̂ infinite and the posterior NaN)
        new = 0.9 * qw + 0.1 * torch.sqrt(b.red["dist2"].sum().to(qw)) / n_total.clamp_min(1).to(qw)
        b.new_group["qw"] = torch.where((n_total > 0) & torch.isfinite(new), new, qw)
        b.coef["a"] = torch.full_like(b.red["dist2"], float(b.hp["a"]))

    def predict_program(self, hp: Mapping[str, Any]) -> list[Assign]:
        theta, u = Vec("theta"), State("u")
        return [
            # θ_ℓ ← θ_ℓ + u_ℓ
            Assign(theta, theta + u),
            # u_ℓ ← a u_ℓ
            Assign(u, Coef("a") * u),
        ]
