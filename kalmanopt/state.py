"""State tables: the one declaration of a part's state, used to create, check and save it.

A part declares its state once, like optax's ``NamedTuple`` states: per-layer vectors (the
layer's size), per-layer scalars, and group tensors shared by all layers of a parameter group.
Every engine creates state from this table, ``load_state_dict`` checks a checkpoint against it,
and the names are the keys in ``optimizer.state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

__all__ = ["VectorState", "ScalarState", "GroupState", "StateTable", "Init"]

#: how an entry starts: a number, or the name of a hyper-parameter whose value it takes
Init = Union[float, str]


def _initial(init: Init, hp: Mapping[str, Any]) -> float:
    if isinstance(init, str):
        return float(hp[init])
    return float(init)


@dataclass(frozen=True)
class VectorState:
    """A per-layer vector of the layer's size, filled with ``init`` (a number or a hyper-parameter)."""

    name: str
    init: Init = 0.0
    doc: str = ""


@dataclass(frozen=True)
class ScalarState:
    """A per-layer scalar (0-d tensor), starting at ``init``."""

    name: str
    init: Init = 0.0
    doc: str = ""


@dataclass(frozen=True)
class GroupState:
    """A tensor shared by the layers of a group (a shared P, the noise R), made by ``init(hp)``.

    ``init`` returns the initial value as nested lists of numbers (a 0-d tensor: a number).
    """

    name: str
    init: Callable[[Mapping[str, Any]], Any]
    doc: str = ""


@dataclass(frozen=True)
class StateTable:
    """The state a part keeps: per-layer vectors and scalars, and group tensors."""

    vectors: tuple[VectorState, ...] = ()
    scalars: tuple[ScalarState, ...] = ()
    group: tuple[GroupState, ...] = field(default=())

    def __add__(self, other: StateTable) -> StateTable:
        table = StateTable(self.vectors + other.vectors, self.scalars + other.scalars, self.group + other.group)
        names = [e.name for e in table.vectors + table.scalars]
        if len(set(names)) != len(names):
            raise ValueError(f"two parts declare the same per-layer state name: {sorted(names)}")
        return table

    @property
    def layer_keys(self) -> tuple[str, ...]:
        """The per-layer keys (vectors, then scalars)."""
        return tuple(e.name for e in self.vectors) + tuple(e.name for e in self.scalars)

    def has_layer_state(self) -> bool:
        """Whether the table declares any per-layer entry."""
        return bool(self.vectors or self.scalars)

    def init_layer(self, state: dict, numel: int, hp: Mapping[str, Any], dtype: torch.dtype,
                   device: torch.device) -> bool:
        """Create the missing per-layer entries in ``state``; returns whether any was created."""
        created = False
        for e in self.vectors:
            if e.name not in state:
                state[e.name] = torch.full((numel,), _initial(e.init, hp), dtype=dtype, device=device)
                created = True
        for e in self.scalars:
            if e.name not in state:
                state[e.name] = torch.full((), _initial(e.init, hp), dtype=dtype, device=device)
                created = True
        return created

    def init_group(self, state: dict, hp: Mapping[str, Any], dtype: torch.dtype, device: torch.device) -> None:
        """Create the missing group entries in ``state``."""
        for e in self.group:
            if e.name not in state:
                state[e.name] = torch.tensor(e.init(hp), dtype=dtype, device=device)

    def check_layer(self, state: Mapping[str, Any], numel: int, where: str) -> None:
        """Raise ``ValueError`` unless ``state`` holds this table's per-layer entries, shaped and finite.

        An empty ``state`` (a layer that never stepped) passes.
        """
        if not state:
            return
        for e in self.vectors:
            _check_tensor(state, e.name, (numel,), where)
        for e in self.scalars:
            _check_tensor(state, e.name, (), where)

    def check_group(self, state: Mapping[str, Any], hp: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` unless ``state`` holds this table's group entries, shaped and finite."""
        for e in self.group:
            shape = tuple(torch.tensor(e.init(hp)).shape)
            _check_tensor(state, e.name, shape, where)


def _check_tensor(state: Mapping[str, Any], name: str, shape: tuple[int, ...], where: str) -> None:
    if name not in state:
        raise ValueError(f"{where}: the state lacks {name!r}")
    t = state[name]
    if not isinstance(t, Tensor):
        raise ValueError(f"{where}: state {name!r} is not a tensor ({type(t).__name__})")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: state {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: state {name!r} is not finite")
