"""Dynamics: the transition F, the process noise Q, and what the filter's state holds.

Random walk: the state is θ, F = I, Q = q I. Momentum (KOALA-M): the state is (θ, u) with u a
velocity, F = [[1, 1], [0, a]], and Q = diag(q_w, q_v) with q_w adapted online from how far the
weights move from their running average (:ref:`docs/derivation.md §3 <derivation-koala-m>`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.covariance.base import Gain
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.layers import Layer
from kalmanopt.part import Part

__all__ = ["Dynamics", "RandomWalk", "Momentum"]


class Dynamics(Part, ABC):
    """How the hidden state evolves between measurements."""

    #: the number of state components per parameter (θ alone: 1; θ and u: 2)
    state_dim: int = 1
    #: whether ``predict`` moves the parameters (the step API then leaves θ̂_{k+1} in them)
    moves_parameters: bool = False

    def init_group_state(self, group_state: dict, hp: Mapping[str, Any], dtype: torch.dtype,
                         device: torch.device) -> None:
        """Create group-level state (default: none)."""

    def init_layer_state(self, layer: Layer) -> None:
        """Create per-layer state if it does not exist yet (default: none). Must be idempotent."""

    @abstractmethod
    def transition(self, group_state: dict, hp: Mapping[str, Any], like: Tensor) -> tuple[Tensor, Tensor]:
        """Return (F, Q): the state_dim × state_dim transition and the diagonal of the noise."""

    def predict(self, layers: Sequence[Layer], group_state: dict, hp: Mapping[str, Any]) -> None:
        """Move the state one step ahead (x̂_k = F x_{k-1}); default: nothing moves (F = I)."""

    def correct(self, layer: Layer, theta: Tensor, gain: Gain, scale: Tensor) -> Tensor:
        """Apply x_k = x̂_k − scale · K to the layer and return the new θ.

        ``gain.coefficients[i]`` multiplies ``gain.direction`` for state component i; ``scale``
        is η_k · L_ℓ (the innovation times the learning rate, L* = 0).
        """
        # θ_k = θ_{k-1} − η L_ℓ K_θ
        return theta - (scale * gain.coefficients[0]) * gain.direction


class RandomWalk(Dynamics):
    """F = I, Q = q I: the weights drift as a random walk between measurements."""

    hyperparameters = (
        HyperParameter("q", 0.1, Range(0.0), "process noise Q added to the covariance each step"),
    )

    def transition(self, group_state: dict, hp: Mapping[str, Any], like: Tensor) -> tuple[Tensor, Tensor]:
        F = torch.ones((1, 1), dtype=like.dtype, device=like.device)
        Q = torch.full((1,), float(hp["q"]), dtype=like.dtype, device=like.device)
        return F, Q


class Momentum(Dynamics):
    """KOALA-M dynamics: state (θ, u), F = [[1, 1], [0, a]], Q = diag(q_w, q_v), q_w adaptive.

    predict:  q_w ← 0.9 q_w + 0.1 ‖(‖w̄_ℓ − θ_ℓ‖₂)_ℓ‖₂ / n_total;  θ_ℓ ← θ_ℓ + u_ℓ;  u_ℓ ← a u_ℓ
    correct:  θ_ℓ ← θ_ℓ − η L_ℓ K_θ;  u_ℓ ← u_ℓ − η L_ℓ K_u;  w̄_ℓ ← 0.9 w̄_ℓ + 0.1 θ_ℓ
    """

    state_dim = 2
    moves_parameters = True
    hyperparameters = (
        HyperParameter("a", 0.9, Range(0.0, 1.0, high_open=True), "decay of the velocity, F = [[1, 1], [0, a]]"),
        HyperParameter("qw", 0.01, Range(0.0), "initial process noise of the weights (adapted online)"),
        HyperParameter("qv", 0.01, Range(0.0), "process noise of the velocities"),
    )

    def init_group_state(self, group_state: dict, hp: Mapping[str, Any], dtype: torch.dtype,
                         device: torch.device) -> None:
        group_state["qw"] = torch.tensor(float(hp["qw"]), dtype=dtype, device=device)

    def init_layer_state(self, layer: Layer) -> None:
        if "u" in layer.state:
            return
        n, dtype, device = layer.numel, layer.dtype, layer.params[0].device
        layer.state["u"] = torch.zeros(n, dtype=dtype, device=device)      # velocity u_ℓ
        layer.state["w_bar"] = torch.zeros(n, dtype=dtype, device=device)  # EMA of the weights w̄_ℓ

    def transition(self, group_state: dict, hp: Mapping[str, Any], like: Tensor) -> tuple[Tensor, Tensor]:
        F = torch.tensor([[1.0, 1.0], [0.0, float(hp["a"])]], dtype=like.dtype, device=like.device)
        Q = torch.stack([group_state["qw"].to(like), torch.tensor(float(hp["qv"]), dtype=like.dtype,
                                                                    device=like.device)])
        return F, Q

    def predict(self, layers: Sequence[Layer], group_state: dict, hp: Mapping[str, Any]) -> None:
        qw = group_state["qw"]
        distances = []
        n_total = 0
        for layer in layers:
            theta = layer.theta()
            # ‖w̄_ℓ − θ_ℓ‖₂, measured before the weights move
            distances.append(torch.linalg.vector_norm(layer.state["w_bar"] - theta).to(qw))
            n_total += layer.numel
            # θ_ℓ ← θ_ℓ + u_ℓ
            layer.write(theta + layer.state["u"])
            # u_ℓ ← a u_ℓ
            layer.state["u"].mul_(hp["a"])
        if n_total > 0:
            # q_w ← 0.9 q_w + 0.1 ‖(‖w̄_ℓ − θ_ℓ‖)_ℓ‖₂ / n_total
            qw.copy_(0.9 * qw + 0.1 * torch.linalg.vector_norm(torch.stack(distances)) / n_total)

    def correct(self, layer: Layer, theta: Tensor, gain: Gain, scale: Tensor) -> Tensor:
        # θ_ℓ ← θ_ℓ − η L_ℓ (P₀₀ / S_ℓ) H_ℓ
        theta = theta - (scale * gain.coefficients[0]) * gain.direction
        # u_ℓ ← u_ℓ − η L_ℓ (P₁₀ / S_ℓ) H_ℓ
        layer.state["u"].sub_((scale * gain.coefficients[1]) * gain.direction)
        # w̄_ℓ ← 0.9 w̄_ℓ + 0.1 θ_ℓ
        layer.state["w_bar"].mul_(0.9).add_(0.1 * theta)
        return theta
