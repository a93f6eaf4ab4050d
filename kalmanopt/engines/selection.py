"""Which engine runs a group: the registry of engines by name, and the choice of the fastest usable one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from kalmanopt.engines.fused import FusedEngine
from kalmanopt.engines.reference import ReferenceEngine
from kalmanopt.engines.torch_ops import ForeachEngine

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.composition import Composition

__all__ = ["IMPLEMENTATIONS", "Engine", "register_engine", "resolve_engine", "available_implementations"]

#: engine names, fastest first
IMPLEMENTATIONS = ("fused", "foreach", "reference")


class Engine(Protocol):
    """The arithmetic of the phases of a step for one parameter group (see :mod:`kalmanopt.engines.driver`)."""

    name: str
    #: whether a whole step runs without a host-device synchronisation
    device_step: bool

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        """``None`` if this engine can run the group, else the reason it cannot."""


_ENGINES: dict[str, list[Any]] = {name: [] for name in IMPLEMENTATIONS}


def register_engine(engine: Any) -> Any:
    """Register an engine under ``engine.name`` (one of :data:`IMPLEMENTATIONS`)."""
    if engine.name not in _ENGINES:
        raise ValueError(f"unknown engine name {engine.name!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    _ENGINES[engine.name].insert(0, engine)
    return engine


register_engine(ReferenceEngine())
register_engine(ForeachEngine())
register_engine(FusedEngine())


def available_implementations(composition: Composition, group: dict[str, Any]) -> dict[str, str | None]:
    """For each engine name, ``None`` if usable for the group when asked for by name, else why not."""
    result: dict[str, str | None] = {}
    for name in IMPLEMENTATIONS:
        asked = {**group, "implementation": name}
        reasons = [engine.unsupported(composition, asked) for engine in _ENGINES[name]]
        if not reasons:
            result[name] = "not available in this installation"
        elif any(r is None for r in reasons):
            result[name] = None
        else:
            result[name] = "; ".join(r for r in reasons if r)
    return result


def resolve_engine(composition: Composition, group: dict[str, Any]) -> Any:
    """The engine a group asks for (``group["implementation"]``), or the fastest usable one.

    Raises:
        ValueError: the requested engine cannot run the group; the message says why and what to choose.
    """
    wanted = group.get("implementation")
    names = IMPLEMENTATIONS if wanted is None else (wanted,)
    if wanted is not None and wanted not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {wanted!r}; valid choices: "
                         f"{', '.join(IMPLEMENTATIONS)} or None (the fastest that applies)")
    reasons = []
    for name in names:
        for engine in _ENGINES[name]:
            reason = engine.unsupported(composition, group)
            if reason is None:
                return engine
            reasons.append(f"{name}: {reason}")
        if not _ENGINES[name]:
            reasons.append(f"{name}: not available in this installation")
    raise ValueError(f"implementation {wanted!r} cannot run {composition.name!r} here ("
                     + "; ".join(reasons) + "); choose implementation='reference' or None")
