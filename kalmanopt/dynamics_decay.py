"""A random walk that decays toward zero: the Kalman reading of decoupled weight decay (AdamW's).

F = (1 − η_k λ) I,  Q = q I:  the weights shrink toward the prior mean 0 between measurements.
The shrink and the correction act on the same θ_{k-1}, as AdamW applies both from one θ:

    θ_k = (1 − η_k λ) θ_{k-1} − η_k L_ℓ K_θ
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.dynamics import RandomWalk
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.program import Assign, Coef, Expr, Vec

__all__ = ["DecayingRandomWalk"]


class DecayingRandomWalk(RandomWalk):
    """F = (1 − η λ) I, Q = q I: a random walk with decoupled weight decay λ (``weight_decay``).

    With ``weight_decay=0`` it is :class:`~kalmanopt.dynamics.RandomWalk`. The decay is not applied
    to a skipped layer (no state of it changes). Pair it with the gradient measurement: the loss
    measurement reads ``weight_decay`` too (folded into H), and the two would both apply it.
    """

    hyperparameters = RandomWalk.hyperparameters + (
        HyperParameter("weight_decay", 0.0, Range(0.0),
                       "decoupled weight decay λ: θ ← (1 − η λ) θ each step (AdamW's weight_decay)"),
    )

    def transition(self, b: Any) -> tuple[Tensor, Tensor]:
        like = b.like
        shrink = b.eta * float(b.hp["weight_decay"])
        F = torch.ones((1, 1), dtype=like.dtype, device=like.device) * (1.0 - shrink)
        Q = torch.full((1,), float(b.hp["q"]), dtype=like.dtype, device=like.device)
        return F, Q

    def correction(self, direction: Expr, steps: Sequence[str], hp: Mapping[str, Any]) -> list[Assign]:
        theta = Vec("theta")
        # θ_k = (1 − η λ) θ_{k-1} − η L_ℓ K_θ
        return [Assign(theta, theta - Coef("shrink") * theta - Coef(steps[0]) * direction)]

    def coefficients(self, b: Any) -> None:
        # η λ, 0 where the layer is skipped
        shrink = torch.ones_like(b.coef["step0"]) * (b.eta * float(b.hp["weight_decay"]))
        b.coef["shrink"] = torch.where(b.skip, torch.zeros_like(shrink), shrink)
