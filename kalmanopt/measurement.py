"""The measurement model: what a minibatch tells the filter.

Each minibatch loss L_k(θ) is a noisy scalar measurement of the target L* (the ``target``
hyper-parameter, 0 by default; a loss that can be negative needs one at or below its minimum). Per layer the
measurement Jacobian is the gradient with weight decay folded in, and the measured value is the
loss with the layer's decay term added. The measurement noise R_k is fixed or estimated online.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.contract import CoefficientStage
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.part import Part
from kalmanopt.program import Assign, Coef, Reduction, Vec, hp_coefficients, prepare_program, reduce_layer
from kalmanopt.state import GroupState, StateTable

#: a layer whose ‖g_ℓ‖₂ is below this is skipped (no state of it changes)
SKIP_GRAD_NORM = 1e-9

__all__ = ["SKIP_GRAD_NORM", "MeasurementModel", "LossMeasurement", "LOSS_STATISTICS", "loss_statistic",
           "split_losses", "as_loss_tensor", "statistics_dtype", "check_loss_device", "parameter_devices"]

#: the loss statistics an online R estimate can follow
LOSS_STATISTICS = ("second_moment", "variance")


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision L_k and s_k are computed in: the loss's, at least float32.

    float16 losses of 300 would overflow their own second moment (300² > 65504) and skip the step.
    """
    return torch.promote_types(dtype, torch.float32)


def as_loss_tensor(loss: Any) -> Tensor:
    """A loss as a detached floating-point tensor: a tensor, or a real Python (or numpy) number.

    A Python number becomes a float64 scalar (as LBFGS takes ``float(closure())``).

    Raises:
        TypeError: anything else (a tuple, a dict, ``None``, a bool, an integer tensor), with what
            a loss must be.
    """
    if isinstance(loss, Tensor):
        _check_loss_storage(loss)
        loss = loss.detach()
    elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
        loss = torch.tensor(float(loss), dtype=torch.float64)
    elif type(loss).__module__ == "numpy" and getattr(loss, "ndim", None) == 0 and loss.dtype.kind in "iuf":
        loss = torch.tensor(float(loss), dtype=torch.float64)
    else:
        raise TypeError(f"the loss must be a floating-point tensor of per-sample losses or their mean, or a "
                        f"Python number; got {type(loss).__name__}. A closure must return the loss itself "
                        "(not a tuple or a dict of outputs), step(loss=...) must be given it")
    if not loss.is_floating_point():
        raise TypeError(f"the loss must be a floating-point tensor, got {loss.dtype}"
                        + (" (an integer or boolean loss has no value to filter: compute it in floating point)"
                           if not loss.is_complex() else " (the filter measures a real loss)"))
    return loss


def _check_loss_storage(loss: Tensor) -> None:
    """Refuse a loss tensor whose values cannot be read as a dense tensor (``ValueError``)."""
    if loss.device.type == "meta":
        raise ValueError("the loss is on the meta device: it has no values to measure (was the model built under "
                         "torch.device('meta') and not materialised?); compute the loss on the parameters' device")
    if getattr(loss, "is_nested", False):
        raise ValueError("the loss is a nested tensor; pass the per-sample losses as one dense 1-D tensor "
                         "(e.g. torch.cat(list_of_losses))")
    if loss.layout != torch.strided:
        raise ValueError(f"the loss is a {loss.layout} tensor; pass it dense (loss.to_dense())")


def parameter_devices(param_groups: Any) -> set[torch.device]:
    """The devices of the parameters of ``param_groups`` (a DTensor's: its local shard's)."""
    return {p.device for group in param_groups for p in group["params"]}


def check_loss_device(loss: Tensor, devices: set[torch.device], what: str = "the loss") -> None:
    """Refuse a loss on another device than the parameters (``ValueError`` naming both); nothing is read.

    A CPU tensor (as a Python number becomes) is accepted anywhere: it is one number or a few, copied to
    the state's device. A loss on another accelerator than the parameters, or on the meta device, is refused.
    """
    if loss.device.type == "cpu" or not devices or loss.device in devices:
        return
    where = ", ".join(sorted(str(d) for d in devices))
    raise ValueError(f"{what} is on {loss.device}, the parameters on {where}; compute it on the parameters' "
                     "device (or pass it as a CPU tensor or a Python number)")


def loss_statistic(losses: Tensor, kind: str, mean: Tensor | None = None) -> Tensor:
    """The statistic s_k of per-sample losses that the online R estimate follows.

    Args:
        losses: per-sample losses ℓ_i (any shape; a scalar counts as one sample).
        kind: ``"second_moment"``: mean_i ℓ_i² (the authors' image code), or ``"variance"``:
            mean_i ℓ_i² − (mean_i ℓ_i)² (their language-model code).
        mean: mean_i ℓ_i where the caller has it already (in the statistic's precision), else None.

    Computed in the losses' precision, at least float32 (:func:`statistics_dtype`).
    """
    if kind not in LOSS_STATISTICS:
        raise ValueError(f"unknown loss_statistic {kind!r}; valid choices: {', '.join(LOSS_STATISTICS)}")
    losses = as_loss_tensor(losses)
    losses = losses.to(statistics_dtype(losses.dtype))
    second_moment = torch.mean(torch.pow(losses, 2))
    if kind == "second_moment":
        return second_moment
    return second_moment - (torch.mean(losses) if mean is None else mean) ** 2


def split_losses(loss: Tensor | float, kind: str, needs_statistic: bool,
                 allow_empty: bool = False) -> tuple[Tensor, Tensor | None]:
    """(L_k, s_k) from the per-sample losses (or their mean) a step is given, in at least float32.

    Given a single number (the mean) where the online R needs a statistic, s_k is mean² — the
    second moment of one sample; the optimizer warns once when that happens.

    Args:
        loss: the per-sample losses ℓ_i, or their mean (a tensor, or a Python number).
        kind: the statistic the online R follows (see :func:`loss_statistic`).
        needs_statistic: whether any filter estimates R online (else s_k is ``None``).
        allow_empty: an empty loss gives (0, 0): a rank of several processes whose micro-batch is empty
            contributes no sample to the global batch (the count it sends is 0); else it is refused.

    Raises:
        TypeError: a loss that is not a floating-point tensor or a real number.
        ValueError: an empty loss, or ``"variance"`` asked of a single (mean) loss.
    """
    losses = as_loss_tensor(loss)
    if losses.numel() == 0 and allow_empty:
        zero = torch.zeros((), dtype=statistics_dtype(losses.dtype), device=losses.device)
        return zero, (zero.clone() if needs_statistic else None)
    if losses.numel() == 0:
        raise ValueError(f"the loss is empty (shape {tuple(losses.shape)}): a batch with no sample has no loss to "
                         "measure; pass the per-sample losses or their mean (and skip the step of an empty batch)")
    if sum(d > 1 for d in losses.shape) > 1:
        raise ValueError(f"the per-sample losses have shape {tuple(losses.shape)}: which entries are the samples? "
                         "Pass one loss per sample as a 1-D tensor (e.g. per-token losses: losses.mean(dim=1) per "
                         "sequence, or losses.flatten() if every entry is a sample), or their mean")
    losses = losses.to(statistics_dtype(losses.dtype))
    mean = losses.mean()
    if not needs_statistic:
        return mean, None
    if losses.numel() == 1 and kind == "variance":
        raise ValueError("loss_statistic='variance' needs the per-sample losses "
                         "(reduction='none'), got a scalar loss; pass step(loss=losses) or fix r")
    return mean, loss_statistic(losses, kind, mean)


class MeasurementModel(Part, ABC):
    """Turns a minibatch into the per-layer measurement (L_ℓ, H_ℓ) and the noise R_k.

    Two-pass contract (see :mod:`kalmanopt.contract`): :meth:`state_table` (the noise estimate),
    :meth:`reductions` (at least ``hh`` = ‖H_ℓ‖²), :meth:`program` (defines the vector ``H``) and
    :meth:`coefficients` (sets ``b.R``, ``b.L`` and the skip rule).
    """

    def contract_gap(self) -> str | None:
        """``None`` if the measurement meets the two-pass contract (the abstract methods say what it needs)."""
        return None

    @abstractmethod
    def state_table(self) -> StateTable:
        """The measurement's group state (the noise estimate)."""

    @abstractmethod
    def reductions(self, hp: Mapping[str, Any]) -> tuple[Reduction, ...]:
        """Per-layer sums; ``hh`` = ‖H_ℓ‖² is required (every surrogate may read it)."""

    @abstractmethod
    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        """Element-wise definitions of the measurement's vectors (at least ``H``)."""

    @abstractmethod
    def coefficients(self, b: Any) -> None:
        """Set ``b.R`` (R_k, and ``b.new_group`` for an online estimate), ``b.L`` (L_ℓ) and skips."""

    # ------------------------------------------------------------------ per layer, from the contract
    def init_state(self, group_state: dict, hp: Mapping[str, Any], dtype: torch.dtype, device: torch.device) -> None:
        """Create the group state of :meth:`state_table` in ``group_state``."""
        self.state_table().init_group(group_state, hp, dtype, device)

    def noise(self, group_state: dict, statistic: Tensor | None, hp: Mapping[str, Any]) -> Tensor:
        """Advance the noise estimate in ``group_state`` once (before any layer) and return R_k."""
        b = self._batch(group_state, {}, statistic, hp, group_state["R"].new_zeros(()))
        self.coefficients(b)
        for name, value in b.new_group.items():
            group_state[name].copy_(value)
        return b.R

    def measure(self, theta: Tensor, g: Tensor, loss: Tensor, hp: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(H_ℓ, L_ℓ) of one layer, from the contract (the program and the coefficients)."""
        env = {"theta": theta, "g": g}
        coefs = hp_coefficients(hp)
        prepare_program(self.program(hp), ()).run(env, coefs)
        reductions = self.reductions(hp)
        red = {r.name: v.reshape(1) for r, v in zip(reductions, reduce_layer(reductions, env, coefs, theta))}
        b = self._batch({"R": theta.new_ones(())}, red, None, {**hp, "r": 1.0}, loss.to(theta).reshape(()))
        self.coefficients(b)
        return env["H"], b.L.reshape(())

    @staticmethod
    def _batch(group_state: dict, red: dict, statistic: Tensor | None, hp: Mapping[str, Any], loss: Tensor) -> Any:
        n = next(iter(red.values())).numel() if red else 0
        if not red:
            red = {"hh": loss.new_zeros(0)}
        device = loss.device
        return CoefficientStage(hp=hp, red=red, layer={}, group=group_state,
                                numel=torch.ones(n, dtype=torch.int64, device=device), loss=loss, statistic=statistic,
                                ok=torch.ones((), dtype=torch.bool, device=device),
                                skip=torch.zeros(n, dtype=torch.bool, device=device))


class LossMeasurement(MeasurementModel):
    """The loss as the measurement, weight decay folded into H and L, R fixed or an EMA.

    H_ℓ = g_ℓ + wd · θ_ℓ;   L_ℓ = L_k + ½ · wd · ‖θ_ℓ‖², measured against the target L* (``target``,
    default 0: the filter's innovation is L* − L_ℓ);
    R_k = r if r is given, else R_k = α_r R_{k-1} + (1 − α_r) s_k with R_0 = 1.
    A layer whose ‖g_ℓ‖₂ < 1e-9 is skipped (no state of it changes), and so is one whose ‖H_ℓ‖² or
    L_ℓ overflows the state precision (counted, reported).
    """

    hyperparameters = (
        HyperParameter("r", None, Range(0.0, low_open=True, allow_none=True),
                       "fixed measurement noise R; None estimates it online from the loss statistic"),
        HyperParameter("alpha_r", 0.9, Range(0.0, 1.0, high_open=True),
                       "smoothing of the online estimate R_k = α_r R_{k-1} + (1 − α_r) s_k"),
        HyperParameter("weight_decay", 0.0, Range(0.0), "L2 weight decay folded into H and L"),
        HyperParameter("target", 0.0, Range(),
                       "the target L* the loss is measured against (the innovation is L* − L_ℓ): 0 for a loss "
                       "that is >= 0; for one that can be negative (a Gaussian negative log-likelihood), a value "
                       "at or below its minimum"),
    )

    def state_table(self) -> StateTable:
        # R_0 = 1
        return StateTable(group=(GroupState("R", lambda hp: 1.0, "the measurement noise R_k"),))

    def reductions(self, hp: Mapping[str, Any]) -> tuple[Reduction, ...]:
        H, g, theta = Vec("H"), Vec("g"), Vec("theta")
        if float(hp["weight_decay"]) == 0.0:  # H = g
            return (Reduction("hh", H * H),)
        return (Reduction("hh", H * H), Reduction("gg", g * g), Reduction("tt", theta * theta))

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        wd = float(hp["weight_decay"])
        # H_ℓ = g_ℓ + wd · θ_ℓ
        return [Assign(Vec("H"), Vec("g") if wd == 0.0 else Vec("g") + Coef("weight_decay") * Vec("theta"))]

    def coefficients(self, b: Any) -> None:
        hp, red = b.hp, b.red
        wd = float(hp["weight_decay"])
        R_k = self.next_noise(b.group["R"], b.statistic, hp)
        if hp["r"] is None:
            b.new_group["R"] = R_k
        b.R = R_k
        hh = red["hh"]
        gg = red.get("gg", hh)
        # L_ℓ − L* = (L_k − L*) + ½ · wd · ‖θ_ℓ‖²   (the measured value against its target; L* = 0 by default)
        target = float(hp.get("target", 0.0))
        excess = b.loss - target if target != 0.0 else b.loss
        b.L = excess + 0.5 * wd * red["tt"] if "tt" in red else excess.expand_as(hh)
        # a loss below its target: reported (the guard's clamped innovation leaves such a layer where it is)
        b.count("below_target", (b.loss < target).to(torch.int64))
        # a layer with ‖g_ℓ‖₂ < 1e-9 is skipped; so is one whose ‖H_ℓ‖² or L_ℓ overflows the state precision
        small = ~(torch.sqrt(gg) >= SKIP_GRAD_NORM)
        overflow = ~small & ~(torch.isfinite(hh) & torch.isfinite(b.L))
        b.skip = b.skip | small | overflow
        b.count("overflow", overflow.sum())

    @staticmethod
    def next_noise(R: Tensor, statistic: Tensor | None, hp: Mapping[str, Any]) -> Tensor:
        """R_k from R_{k-1} (not in place), at or above the smallest normal number of the state precision."""
        # R_k is kept at or above the smallest normal number, so that S_k ≥ R_k > 0 (an R that underflows to
        # 0, e.g. after many zero losses, would make S_k = 0 possible)
        floor = torch.finfo(R.dtype).tiny
        if hp["r"] is not None:
            # R_k = r (fixed)
            return torch.full_like(R, hp["r"]).clamp_min_(floor)
        if statistic is None:
            raise ValueError("r is None (online noise estimate) but no loss statistic was given")
        # R_k = α_r R_{k-1} + (1 − α_r) s_k   (a statistic below 0 — a variance rounded below zero — counts as 0)
        alpha = hp["alpha_r"]
        return (alpha * R + (1.0 - alpha) * statistic.to(R).clamp_min(0.0)).clamp_min(floor)
