"""How a step is computed: the reference path and the fast paths, selected by name.

Like torch's ``foreach`` / ``fused`` flags, ``implementation=`` picks the arithmetic:

- ``"reference"``: the per-layer teaching code (:mod:`kalmanopt.reference`), every composition.
- ``"foreach"`` / ``"fused"``: fast paths registered by :func:`register_implementation`, each for
  the compositions it supports, tested equal to the reference.
- ``None``: the fastest registered implementation that supports the composition and the group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.filters.composition import Composition
    from kalmanopt.layers import Layer
    from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["IMPLEMENTATIONS", "Implementation", "register_implementation", "resolve_implementation",
           "available_implementations"]

#: implementation names, fastest first
IMPLEMENTATIONS = ("fused", "foreach", "reference")


class Implementation(Protocol):
    """The arithmetic of one step for one parameter group."""

    name: str

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        """``None`` if this implementation can run the group, else the reason it cannot."""

    def predict(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
                layers: Sequence[Layer]) -> None:
        """The predict phase (dynamics and the shared covariance)."""

    def update(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
               layers: Sequence[Layer], loss: Tensor, statistic: Tensor | None) -> None:
        """The update phase, for a loss and statistic already checked finite."""


_IMPLEMENTATIONS: dict[str, list[Implementation]] = {name: [] for name in IMPLEMENTATIONS}


def register_implementation(impl: Implementation) -> Implementation:
    """Register an implementation under ``impl.name`` (one of :data:`IMPLEMENTATIONS`)."""
    if impl.name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation name {impl.name!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    _IMPLEMENTATIONS[impl.name].insert(0, impl)
    return impl


def _load_builtin() -> None:
    import kalmanopt.reference  # noqa: F401  (registers "reference")

    try:  # the fast paths register themselves; they are optional
        import kalmanopt.fast  # noqa: F401
    except ImportError:
        pass


def available_implementations(composition: Composition, group: dict[str, Any]) -> dict[str, str | None]:
    """For each implementation name, ``None`` if usable for the group, else why not."""
    _load_builtin()
    result: dict[str, str | None] = {}
    for name in IMPLEMENTATIONS:
        reasons = [impl.unsupported(composition, group) for impl in _IMPLEMENTATIONS[name]]
        if not reasons:
            result[name] = "not available in this installation"
        elif any(r is None for r in reasons):
            result[name] = None
        else:
            result[name] = "; ".join(r for r in reasons if r)
    return result


def resolve_implementation(composition: Composition, group: dict[str, Any]) -> Implementation:
    """The implementation a group asks for (``group["implementation"]``), or the fastest usable."""
    _load_builtin()
    wanted = group.get("implementation")
    names = IMPLEMENTATIONS if wanted is None else (wanted,)
    if wanted is not None and wanted not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {wanted!r}; valid choices: "
                         f"{', '.join(IMPLEMENTATIONS)} or None (the fastest that applies)")
    reasons = []
    for name in names:
        for impl in _IMPLEMENTATIONS[name]:
            reason = impl.unsupported(composition, group)
            if reason is None:
                return impl
            reasons.append(f"{name}: {reason}")
        if not _IMPLEMENTATIONS[name]:
            reasons.append(f"{name}: not available in this installation")
    raise ValueError(f"implementation {wanted!r} cannot run {composition.name!r} here ("
                     + "; ".join(reasons) + "); choose implementation='reference' or None")
