"""transformers: ``KalmanTrainer`` (per-sample losses) and ``KalmanCallback`` (a plain ``Trainer``).

``Trainer`` calls ``optimizer.step()`` with no arguments; these hand the loss to the filter first::

    from kalmanopt.integrations.transformers import KalmanCallback, KalmanTrainer

    trainer = KalmanTrainer(model=model, args=args, train_dataset=data,
                            optimizer_cls_and_kwargs=(kalmanopt.optim.KoalaPP, {"lr": 1.0}))
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, scheduler),
                      callbacks=[KalmanCallback()])

``KalmanTrainer`` computes the per-sample losses itself (:mod:`kalmanopt.integrations.hf_losses`: causal
LM, masked LM, token and sequence classification) and trains on their mean over the accumulated batch,
as ``Trainer`` does with ``num_items_in_batch``: what the filter measures and what the gradient is of
agree, with ``gradient_accumulation_steps`` too. ``KalmanCallback`` observes the model's own ``loss``
(a mean: the online R then follows its square, and the optimizer warns so once).

Checkpoints are ``Trainer``'s own: the optimizer's ``state_dict`` holds the whole filter state, so
``train(resume_from_checkpoint=...)`` continues where the run stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback

from kalmanopt.api import find_kalman_optimizer, observe
from kalmanopt.integrations.hf_losses import TASKS, per_sample_losses, task_of

__all__ = ["KalmanTrainer", "KalmanCallback"]

#: how a Trainer is given a kalmanopt optimizer (named by the errors)
HOW = ("give the Trainer a kalmanopt optimizer: optimizers=(kalmanopt.create(...), scheduler) or "
       "optimizer_cls_and_kwargs=(kalmanopt.optim.KoalaPP, {...})")


def _unwrapped(trainer: Trainer, model: torch.nn.Module) -> torch.nn.Module:
    return trainer.accelerator.unwrap_model(model)


class KalmanTrainer(Trainer):
    """A ``transformers.Trainer`` that hands the per-sample losses of each micro-batch to the filter.

    Args:
        per_sample_loss: ``fn(outputs, labels) -> losses`` (1-D) for a model whose task is not one of
            :data:`~kalmanopt.integrations.hf_losses.TASKS`; the training loss is then their mean.
        args, kwargs: as ``Trainer``'s; its optimizer must be a kalmanopt optimizer (``optimizers=`` or
            ``optimizer_cls_and_kwargs=``).

    Raises:
        ValueError: a model whose per-sample losses are unknown and no ``per_sample_loss``.
        TypeError: (at ``train``) an optimizer that is not a kalmanopt optimizer.
    """

    #: compute_loss returns the loss already normalised over the accumulated batch
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, per_sample_loss: Callable[[Any, Tensor], Tensor] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_sample_loss = per_sample_loss
        self.kalman_task = None if per_sample_loss is not None else task_of(_unwrapped(self, self.model))
        if self.kalman_task == "causal_lm":
            # Trainer counts num_items_in_batch over labels[..., 1:] only where the model's loss_type names the
            # causal-LM loss; GPT-2's (None) does not, and every row's first label would be counted, although no
            # prediction targets it: the loss would be the mean × (T - 1) / T
            self._loss_shifts_labels = True
        if per_sample_loss is None and self.kalman_task is None:
            raise ValueError(f"KalmanTrainer knows the per-sample losses of {', '.join(TASKS)} models; "
                             f"{type(self.model).__name__} is none of these: pass per_sample_loss=fn(outputs, labels) "
                             "returning them, or use a plain Trainer with callbacks=[KalmanCallback()] (the model's "
                             "own mean loss)")

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """``Trainer``'s; then the optimizer must be a kalmanopt optimizer (``TypeError`` otherwise)."""
        optimizer = super().create_optimizer(model)
        try:
            find_kalman_optimizer(optimizer)
        except TypeError as exc:
            raise TypeError(f"KalmanTrainer: {exc}; {HOW}") from None
        return optimizer

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Any:
        """The mean of the per-sample losses over the accumulated batch; in training, they are observed.

        In training the micro-batch's per-sample losses go to ``kalmanopt.observe``, and the loss returned
        is their sum over ``num_items_in_batch`` (the accumulated batch's count of labelled items, as
        ``Trainer`` computes it) or, where that count does not count samples, their mean over the
        accumulation steps. In evaluation it is their mean.
        """
        if "labels" not in inputs:
            raise ValueError(f"KalmanTrainer needs the labels in each batch (got the keys {sorted(inputs)}); "
                             "a data collator for the task adds them")
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)
        outputs = model(**inputs)
        if self.per_sample_loss is not None:
            losses = self.per_sample_loss(outputs, labels)
        else:
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            losses = per_sample_losses(self.kalman_task, logits, labels, config=_unwrapped(self, model).config,
                                       shift_labels=shift_labels, label_smoothing=self.args.label_smoothing_factor)
        if not (model.training and torch.is_grad_enabled()):
            loss = losses.mean()
        else:
            if losses.numel():  # (a micro-batch whose labels are all ignored adds no sample)
                observe(self.optimizer, losses)
            loss = self._scaled(losses, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _scaled(self, losses: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
        """This micro-batch's share of the accumulated batch's mean loss."""
        counts_samples = self.per_sample_loss is None and (
            self.kalman_task != "sequence_classification" or labels.dim() == 1)
        if num_items_in_batch is not None and counts_samples:
            loss = losses.sum() / torch.as_tensor(num_items_in_batch, device=losses.device)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # (the count is the global one, as Trainer's)
            return loss
        return losses.mean() / self.current_gradient_accumulation_steps


class KalmanCallback(TrainerCallback):
    """Makes a plain ``Trainer`` with a kalmanopt optimizer work: observes the model's own ``loss``.

    A forward hook on the model records each training micro-batch's ``loss``; before each optimizer
    step the callback observes the loss the Trainer trains on for the accumulated batch: the sum of the
    micro-batches' losses where the model normalised them by ``num_items_in_batch`` (``Trainer`` passes
    it to models that take it), else each micro-batch's mean (their mean is the accumulated batch's).
    The loss is a mean, so the online R follows its square; for the per-sample losses use
    :class:`KalmanTrainer`. (With GPT-2, whose ``loss_type`` is None, ``Trainer`` counts every row's first
    label too, so its loss is the mean × (T − 1)/T; the callback observes what the gradient is of.)
    """

    def __init__(self) -> None:
        self._hook: Any = None
        self._recorded: list[tuple[Tensor, Any]] = []
        self._scale = 1

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Check the optimizer, and hook the model's forward."""
        try:
            find_kalman_optimizer(optimizer)
        except TypeError as exc:
            raise TypeError(f"KalmanCallback: {exc}; {HOW}") from None
        self._remove_hook()
        self._recorded.clear()
        world = int(getattr(args, "world_size", 1))
        self._scale = world if getattr(args, "average_tokens_across_devices", False) and world > 1 else 1
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation
        if isinstance(output, Mapping):
            loss = output.get("loss")
        elif isinstance(output, (tuple, list)) and "labels" in kwargs:
            loss = output[0]
        else:
            loss = None
        if loss is not None:
            self._recorded.append((loss.detach(), kwargs.get("num_items_in_batch")))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        """Observe the accumulated batch's loss."""
        recorded, self._recorded = self._recorded, []
        if not recorded:
            raise RuntimeError("KalmanCallback saw no loss in this step's forward passes: the model must return "
                               "its loss (give it labels), or use KalmanTrainer, which computes the loss itself")
        if all(items is not None for _, items in recorded):
            # each micro-batch's loss is its sum over the accumulated batch's count: their sum is the mean
            observe(optimizer, torch.stack([loss.float() for loss, _ in recorded]).sum() * self._scale)
        else:
            for loss, _ in recorded:
                observe(optimizer, loss)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the hook."""
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
