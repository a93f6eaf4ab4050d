"""Per-sample losses of transformers models, from their logits and labels, as the models reduce them.

The models' own losses are means (over tokens or examples); the filter wants the terms of that mean,
so that its online R follows their second moment or variance. :func:`per_sample_losses` gives them
for the tasks below, in the order and with the masking of transformers' own loss functions: their
mean is the model's loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TASKS", "task_of", "per_sample_losses", "IGNORE_INDEX"]

#: the label transformers' losses ignore
IGNORE_INDEX = -100

#: the tasks with per-sample losses, and what a sample is
TASKS = {
    "causal_lm": "a predicted token (labels shifted by one, -100 ignored)",
    "masked_lm": "a labelled token (-100 ignored)",
    "token_classification": "a labelled token (-100 ignored)",
    "sequence_classification": "an example (cross-entropy, MSE or BCE as the config's problem_type)",
}


def task_of(model: Any) -> str | None:
    """The task of a transformers model by its class (transformers' auto mappings), or None."""
    from transformers.models.auto import modeling_auto as auto

    mappings = {
        "causal_lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "masked_lm": auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "token_classification": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "sequence_classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }
    name = type(model).__name__
    for task, mapping in mappings.items():
        if name in set(mapping.values()):
            return task
    return None


def _token_losses(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    logits = logits.float()  # (transformers upcasts too)
    labels = labels.reshape(-1).to(logits.device)
    losses = F.cross_entropy(logits.reshape(labels.numel(), -1), labels, ignore_index=IGNORE_INDEX,
                             reduction="none", label_smoothing=label_smoothing)
    return losses[labels != IGNORE_INDEX]


def per_sample_losses(task: str, logits: Tensor, labels: Tensor, *, config: Any = None,
                      shift_labels: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """The per-sample losses (1-D) of one batch; their mean is the model's own loss.

    Args:
        task: one of :data:`TASKS`.
        logits: the model's logits.
        labels: the batch's labels (for ``causal_lm``, unshifted, as the models take them).
        config: the model's config (``sequence_classification`` reads ``num_labels`` and ``problem_type``).
        shift_labels: ``causal_lm``: labels already shifted (padding-free collators give them), or None.
        label_smoothing: transformers' ``label_smoothing_factor``, for the cross-entropy tasks.

    Raises:
        ValueError: an unknown task, naming the valid ones.
    """
    if task == "causal_lm":
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        return _token_losses(logits, shift_labels, label_smoothing)
    if task in ("masked_lm", "token_classification"):
        return _token_losses(logits, labels, label_smoothing)
    if task == "sequence_classification":
        return _sequence_losses(logits, labels, config, label_smoothing)
    raise ValueError(f"unknown task {task!r}; per-sample losses are known for: {', '.join(TASKS)}")


def _sequence_losses(logits: Tensor, labels: Tensor, config: Any, label_smoothing: float) -> Tensor:
    """Per-example losses as transformers' sequence-classification heads reduce them."""
    num_labels = int(getattr(config, "num_labels", logits.shape[-1]))
    problem = getattr(config, "problem_type", None)
    if problem is None:  # (the models' own rule)
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    labels = labels.to(logits.device)
    if problem == "regression":
        if num_labels == 1:
            return (logits.reshape(-1).float() - labels.reshape(-1).float()) ** 2
        return ((logits.float() - labels.float()) ** 2).reshape(logits.shape[0], -1).mean(-1)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels).float(), labels.reshape(-1), reduction="none",
                               label_smoothing=label_smoothing)
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none") \
            .reshape(logits.shape[0], -1).mean(-1)
    raise ValueError(f"unknown problem_type {problem!r}; transformers' are regression, "
                     "single_label_classification, multi_label_classification")
