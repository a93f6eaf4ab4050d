"""Losses observed between steps: how the loss reaches the filter when ``step()`` gets no argument.

Trainers call ``optimizer.step()`` with no arguments (``transformers.Trainer``, accelerate's
``AcceleratedOptimizer``, ``GradScaler.step(opt)``, timm's ``NativeScaler``). The filter needs the
loss, and ideally the per-sample losses (the online R follows their second moment or variance), so
the training loop, or an integration, hands them over once per micro-batch::

    losses = F.cross_entropy(model(x), y, reduction="none")
    (losses.mean() / accumulation_steps).backward()
    opt.observe(losses)                     # or kalmanopt.observe(wrapped_optimizer, losses)
    ...
    opt.step()                              # uses what was observed since the last step

What the accumulated batch is, for the filter's statistics:

- **per-sample losses** (a tensor with at least one dimension): the micro-batches' losses are one
  batch, their concatenation. L_k is the mean over every sample of every micro-batch,
  ``second_moment`` the mean of ℓ², ``variance`` the mean of ℓ² minus L_k²: the spread *between*
  micro-batches counts, as it would in one large batch (the mean of the micro-batches' variances
  would leave it out). One observation is used as given, so ``observe(losses); step()`` is
  bit-identical to ``step(loss=losses)``.
- **mean losses** (a 0-d tensor or a Python number, one per micro-batch): only the micro-batches'
  means are known. L_k is their mean (the accumulated batch's mean for micro-batches of equal
  size), and the step is the one ``step(loss=L_k)`` takes: the statistic is L_k² (with the
  optimizer's one-time warning that R then follows the mean²; ``variance`` cannot be formed).

Mixing the two kinds within one step is refused (``ValueError``): their weights are not comparable.
Observations are paired with the gradients, which checkpoints do not hold either: they are not part
of ``state_dict``, and ``step`` consumes them (a step that is skipped for non-finite input included).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from kalmanopt.measurement import as_loss_tensor, statistics_dtype

__all__ = ["ObservedLosses", "closure_loss", "INTEGRATIONS", "NO_LOSS"]

#: where a framework's loss reaches the filter (named by the no-loss error)
INTEGRATIONS = ("kalmanopt.integrations.transformers (KalmanTrainer, KalmanCallback)",
                "kalmanopt.integrations.lightning (KalmanCallback)")

#: the error of a ``step()`` that has no loss: none given, no closure, nothing observed
NO_LOSS = ("{owner}.step needs the loss, and none was observed since the last step: call "
           "opt.observe(per_sample_losses) once per micro-batch (kalmanopt.observe(optimizer, losses) finds the "
           "optimizer inside accelerate's or Lightning's wrappers), or use an integration ({integrations}), or pass "
           "step(loss=per_sample_losses) or step(closure) with a closure that returns the loss. Nothing changed")

#: the two kinds of observation
PER_SAMPLE, MEAN = "per-sample losses", "a mean loss"


class ObservedLosses:
    """The losses observed since the last step, combined into the loss that step uses.

    Owned by a :class:`~kalmanopt.KalmanOptimizer` (its ``observe`` adds to it, its ``step`` takes
    from it); see the module documentation for how micro-batches combine.
    """

    def __init__(self) -> None:
        self._losses: list[Tensor] = []
        self._kind: str | None = None

    def __len__(self) -> int:
        """How many observations are pending."""
        return len(self._losses)

    @property
    def kind(self) -> str | None:
        """``"per-sample losses"``, ``"a mean loss"``, or ``None`` when nothing is pending."""
        return self._kind

    def add(self, loss: Any) -> None:
        """Record one micro-batch's losses: per-sample (``reduction="none"``, any shape) or their mean.

        Raises:
            TypeError: not a floating-point tensor or a real number (as ``step(loss=...)``).
            ValueError: an empty tensor, or a mean where per-sample losses were observed for this step
                (or the other way round).
        """
        losses = as_loss_tensor(loss)
        if losses.numel() == 0:
            raise ValueError("observe() was given an empty tensor; pass the per-sample losses or their mean")
        kind = MEAN if losses.dim() == 0 else PER_SAMPLE
        if self._kind is not None and kind != self._kind:
            raise ValueError(f"observe() was given {kind} after {self._kind} for the same step; observe one kind per "
                             "step (per-sample losses, reduction='none', are preferred: R follows their statistic)")
        self._kind = kind
        self._losses.append(losses.clone())  # (the caller may reuse its tensor in place)

    def clear(self) -> None:
        """Forget what was observed (``step`` does this when it takes the losses)."""
        self._losses.clear()
        self._kind = None

    def take(self) -> Tensor:
        """The accumulated batch's loss for a step, and forget it: the concatenated per-sample losses, or the
        mean of the mean losses (a 0-d tensor). One observation comes back as it was given.

        Raises:
            RuntimeError: nothing was observed.
        """
        if not self._losses:
            raise RuntimeError("nothing was observed since the last step")
        losses, kind = list(self._losses), self._kind
        self.clear()
        if len(losses) == 1:
            return losses[0]
        dtype = losses[0].dtype
        for t in losses[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        # (a Python number observed beside device tensors is a CPU tensor: it joins them on their device)
        device = next((t.device for t in losses if t.device.type != "cpu"), losses[0].device)
        if kind == PER_SAMPLE:
            return torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in losses])
        return torch.stack([t.to(device=device, dtype=statistics_dtype(dtype)) for t in losses]).mean()

    def step_loss(self, closure: Callable[[], Any] | None, loss: Any, owner: str) -> tuple[Any, Any]:
        """``(the loss the step uses, what step returns)`` for ``step(closure, loss=...)``.

        In order: an explicit ``loss`` (observations pending are dropped: they were of the same batch);
        else the closure runs (with gradients enabled, as torch's) and what was observed, before or
        during it, wins over its return value (a trainer's closure returns a loss already divided by
        the accumulation steps, and only the last micro-batch's); else the closure's loss; else the
        observations. With none of these: ``TypeError`` (:data:`NO_LOSS`), and nothing changed.

        What ``step`` returns: the explicit ``loss`` if one was given, else the closure's value if there is a
        closure (torch's convention), else the observed loss it used.
        """
        if loss is not None:
            if closure is not None:
                with torch.enable_grad():
                    closure()
            self.clear()
            return loss, loss
        if closure is not None:
            with torch.enable_grad():
                out = closure()
            if self._losses:
                return self.take(), out
            return closure_loss(out, owner), out
        if not self._losses:
            raise TypeError(NO_LOSS.format(owner=owner, integrations="; ".join(INTEGRATIONS)))
        taken = self.take()
        return taken, taken


def closure_loss(out: Any, owner: str) -> Any:
    """A closure's return value, which must be the loss: a tensor (per-sample losses or their mean) or a number.

    Raises:
        TypeError: ``None``, a tuple, a list or a dict, saying what the closure must return.
    """
    if out is None:  # (Lightning's do-nothing closure, where optimizer_step calls optimizer.step() bare)
        raise TypeError(f"the closure returned None; {owner}.step(closure) needs it to return the loss: a tensor of "
                        "per-sample losses or their mean, or a Python number. "
                        + NO_LOSS.format(owner=owner, integrations="; ".join(INTEGRATIONS)))
    if isinstance(out, (tuple, list, dict)):
        raise TypeError(f"the closure returned {type(out).__name__}; {owner}.step(closure) needs it to return the "
                        "loss: a tensor of per-sample losses or their mean, or a Python number (return loss, not "
                        "(loss, output) or a dict), or to observe the loss (opt.observe(losses)) before it returns")
    return out
