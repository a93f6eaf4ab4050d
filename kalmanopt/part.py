"""The common base of every filter part: a name and the hyper-parameters it reads."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from kalmanopt.hyperparams import HyperParameter

__all__ = ["Part"]


class Part:
    """Base of measurement models, dynamics, covariance surrogates and least-squares estimators.

    A part is a small object with no tensors of its own: it reads its hyper-parameters from the
    ``param_group`` it is applied to and keeps its state in the dictionaries the optimizer hands
    it, so that ``state_dict()`` sees every tensor. Subclasses declare ``hyperparameters``.
    """

    #: the registry name of the part (set by :func:`kalmanopt.registry.register_part`)
    name: ClassVar[str] = ""
    #: the hyper-parameters this part reads from a ``param_group``
    hyperparameters: ClassVar[tuple[HyperParameter, ...]] = ()

    def options(self) -> dict[str, object]:
        """Structural options given at construction (shown in ``repr`` and ``kalmanopt list``)."""
        return {}

    def check_hyperparameters(self, hp: Mapping[str, Any]) -> None:
        """Checks that involve several hyper-parameters (each one's own range is checked already).

        Raise ``ValueError`` naming the parameters, their values and the valid region; default: none.
        """

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
