"""The health of a finished run: did it train, or does its number only look like a result?

Every run ends in one of four states (``status`` in ``results.json``), checked in this order:

- ``diverged``: the training loss became non-finite; the run stopped there.
- ``degenerate``: the Kalman filter's guards fired too often: skipped layer updates above
  :data:`THRESHOLDS` ``["skipped_fraction"]`` of all layer updates (steps × layers), guard
  restarts above ``["guard_restart_fraction"]`` of them, or non-finite steps (skipped batches)
  above ``["nonfinite_fraction"]`` of the steps.
- ``stalled``: it did not learn: a classification accuracy no better than
  ``["chance_factor"]`` × chance (15 % for 10 classes), or a final training loss above
  ``["initial_loss_fraction"]`` × the loss of the first minibatch (not 2 % below it).
- ``finished``: none of the above.

``status_reason`` says which threshold was crossed, with the numbers.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["THRESHOLDS", "HEALTHY", "STATUSES", "assess"]

#: the documented thresholds of :func:`assess`
THRESHOLDS: dict[str, float] = {
    "skipped_fraction": 0.02,        # skipped layer updates / (steps x layers)
    "guard_restart_fraction": 0.02,  # guard restarts / (steps x layers)
    "nonfinite_fraction": 0.01,      # non-finite (skipped) steps / steps
    "chance_factor": 1.5,            # accuracy at most this times chance: stalled
    "initial_loss_fraction": 0.98,   # final training loss above this times the first one: stalled
}

#: the healthy status
HEALTHY = "finished"

#: every status a complete run can have, healthy first
STATUSES = ("finished", "degenerate", "stalled", "diverged")


def assess(record: dict[str, Any], *, layers: int, num_classes: int | None = None) -> tuple[str, str]:
    """``(status, reason)`` of a run record (see the module docstring); reason is ``""`` when healthy.

    Args:
        record: the run's record: ``status`` (``"diverged"`` is kept), ``steps``, ``counters``
            (Kalman optimizers), ``initial_train_loss``, ``final_train_loss``, ``val_accuracy``.
        layers: the parameter tensors the optimizer updates (the unit of ``skipped_layers``).
        num_classes: for classification, the number of classes (chance is 1 / num_classes).
    """
    if record.get("status") == "diverged":
        return "diverged", "the training loss became non-finite"
    steps = max(int(record.get("steps") or 0), 1)
    counters = record.get("counters") or {}
    updates = steps * max(layers, 1)
    checks = (("skipped_layers", updates, "skipped_fraction", "of the layer updates were skipped"),
              ("guard_restarts", updates, "guard_restart_fraction", "of the layer updates restarted the guard"),
              ("nonfinite_steps", steps, "nonfinite_fraction", "of the steps had a non-finite loss or gradient"))
    for counter, total, key, what in checks:
        count = int(counters.get(counter, 0) or 0)
        if count > THRESHOLDS[key] * total:
            return "degenerate", (f"{counter} {count}: {100 * count / total:.1f} % {what} "
                                  f"(threshold {100 * THRESHOLDS[key]:g} %)")
    accuracy = record.get("val_accuracy")
    if num_classes and isinstance(accuracy, (int, float)) and math.isfinite(accuracy):
        limit = THRESHOLDS["chance_factor"] / num_classes
        if accuracy <= limit:
            return "stalled", (f"val accuracy {100 * accuracy:.1f} % is no better than chance "
                               f"({100 / num_classes:.1f} %; threshold {100 * limit:.1f} %)")
    first, last = record.get("initial_train_loss"), record.get("final_train_loss")
    if isinstance(first, (int, float)) and isinstance(last, (int, float)) and math.isfinite(first) \
            and math.isfinite(last) and first > 0 and last > THRESHOLDS["initial_loss_fraction"] * first:
        return "stalled", (f"final training loss {last:.4g} is not below the first minibatch's {first:.4g} "
                           f"(threshold {THRESHOLDS['initial_loss_fraction']:g} x)")
    return HEALTHY, ""
