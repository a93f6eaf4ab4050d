"""State tables: the one declaration of a part's state, used to create, check and save it.

A part declares its state once, like optax's ``NamedTuple`` states: per-layer vectors (the
layer's size), per-layer scalars, per-layer factors of a layer read as a matrix (a vector or a square
matrix along its rows or its columns, see :mod:`kalmanopt.matrix`), and group tensors shared by all
layers of a parameter group.
Every engine creates state from this table, ``load_state_dict`` checks a checkpoint against it,
and the names are the keys in ``optimizer.state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

__all__ = ["VectorState", "ScalarState", "FactorState", "GroupState", "StateTable", "Init", "matricised_shape"]

#: how an entry starts: a number, or the name of a hyper-parameter whose value it takes
Init = Union[float, str]


def _initial(init: Init, hp: Mapping[str, Any]) -> float:
    if isinstance(init, str):
        return float(hp[init])
    return float(init)


@dataclass(frozen=True)
class VectorState:
    """A per-layer vector of the layer's size, filled with ``init`` (a number or a hyper-parameter).

    ``workspace=True``: a buffer a matrix stage fills before every use (the expanded covariance of a factored
    surrogate, a preconditioned gradient): kept between steps only so that engines find it where they find
    every vector, never saved in a state dict (a loaded optimizer makes it afresh).
    """

    name: str
    init: Init = 0.0
    doc: str = ""
    workspace: bool = False


def matricised_shape(shape: tuple[int, ...]) -> tuple[int, int, bool]:
    """A parameter of ``shape`` read as a matrix: (rows, columns, whether it is one).

    A weight of two or more dimensions is (shape[0], the product of the rest): a linear layer's
    (out, in), a convolution's (out, in·kh·kw). A vector or a scalar is a column (numel, 1) and not a
    matrix: a part's factors of such a layer follow its diagonal rule.
    """
    if len(shape) >= 2:
        rows = int(shape[0])
        cols = 1
        for d in shape[1:]:
            cols *= int(d)
        return rows, cols, rows > 0 and cols > 0
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel, 1, False


@dataclass(frozen=True)
class FactorState:
    """A per-layer factor of a layer read as an m × n matrix (:func:`matricised_shape`).

    ``side``: ``"rows"`` (size m) or ``"cols"`` (size n). ``square``: a k × k matrix, started at ``init`` · I,
    else a vector of k, filled with ``init``. A square factor of a side larger than ``max_size`` (an int or the
    name of a hyper-parameter), or of a layer that is not a matrix, is kept as its diagonal (a vector of k):
    the part's diagonal rule, so that an embedding's 50 000 rows never make a 50 000² matrix.
    """

    name: str
    side: str
    square: bool = False
    init: Init = 1.0
    max_size: int | str | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.side not in ("rows", "cols"):
            raise ValueError(f"FactorState {self.name!r}: side must be 'rows' or 'cols', got {self.side!r}")

    def shape(self, param_shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[int, ...]:
        """The factor's shape for a parameter of ``param_shape`` with the group's hyper-parameters ``hp``."""
        rows, cols, matrix = matricised_shape(tuple(param_shape))
        k = rows if self.side == "rows" else cols
        if not self.square:
            return (k,)
        limit = self.max_size
        if isinstance(limit, str):
            limit = int(hp[limit])
        dense = matrix and (limit is None or k <= limit)
        return (k, k) if dense else (k,)

    def initial(self, param_shape: tuple[int, ...], hp: Mapping[str, Any], dtype: torch.dtype,
                device: torch.device) -> Tensor:
        """The factor's first value: ``init`` · I (dense) or filled with ``init`` (a vector or a diagonal)."""
        shape = self.shape(param_shape, hp)
        value = _initial(self.init, hp)
        if len(shape) == 2:
            return torch.eye(shape[0], dtype=dtype, device=device) * value
        return torch.full(shape, value, dtype=dtype, device=device)


@dataclass(frozen=True)
class ScalarState:
    """A per-layer scalar (0-d tensor), starting at ``init``."""

    name: str
    init: Init = 0.0
    doc: str = ""

    def initial(self, hp: Mapping[str, Any]) -> float:
        """The scalar's first value for a group's hyper-parameters ``hp``."""
        return _initial(self.init, hp)


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
    """The state a part keeps: per-layer vectors, scalars and factors, and group tensors."""

    vectors: tuple[VectorState, ...] = ()
    scalars: tuple[ScalarState, ...] = ()
    group: tuple[GroupState, ...] = field(default=())
    factors: tuple[FactorState, ...] = ()

    def __add__(self, other: StateTable) -> StateTable:
        table = StateTable(self.vectors + other.vectors, self.scalars + other.scalars, self.group + other.group,
                           self.factors + other.factors)
        names = [e.name for e in table.vectors + table.scalars + table.factors]
        if len(set(names)) != len(names):
            raise ValueError(f"two parts declare the same per-layer state name: {sorted(names)}")
        return table

    @property
    def layer_keys(self) -> tuple[str, ...]:
        """The per-layer keys (vectors, then scalars)."""
        return tuple(e.name for e in self.vectors) + tuple(e.name for e in self.scalars)

    def has_layer_state(self) -> bool:
        """Whether the table declares any per-layer entry."""
        return bool(self.vectors or self.scalars or self.factors)

    @property
    def stored_vector_keys(self) -> tuple[str, ...]:
        """The per-layer vectors kept between steps (the ones ``state_dtype`` stores narrower)."""
        return tuple(e.name for e in self.vectors if not e.workspace)

    @property
    def workspace_keys(self) -> tuple[str, ...]:
        """The per-layer vectors that are workspace (made before every use, never saved)."""
        return tuple(e.name for e in self.vectors if e.workspace)

    def init_factors(self, state: dict, param_shape: tuple[int, ...], hp: Mapping[str, Any], dtype: torch.dtype,
                     device: torch.device) -> bool:
        """Create the missing factors of a layer whose parameter has ``param_shape``; whether any was created."""
        created = False
        for e in self.factors:
            if e.name not in state:
                state[e.name] = e.initial(param_shape, hp, dtype, device)
                created = True
        return created

    def init_layer(self, state: dict, numel: int, hp: Mapping[str, Any], dtype: torch.dtype,
                   device: torch.device, vector_dtype: torch.dtype | None = None) -> bool:
        """Create the missing per-layer entries in ``state``; returns whether any was created.

        ``vector_dtype``: the precision the vectors are stored in (``state_dtype``), else ``dtype``; workspace
        vectors, scalars and factors are in ``dtype``.
        """
        created = False
        for e in self.vectors:
            if e.name not in state:
                stored = dtype if vector_dtype is None or e.workspace else vector_dtype
                state[e.name] = torch.full((numel,), _initial(e.init, hp), dtype=stored, device=device)
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

    def factor_shapes(self, param_shape: tuple[int, ...], hp: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shape of each factor for a parameter of ``param_shape`` (what a checkpoint must hold)."""
        return {e.name: e.shape(param_shape, hp) for e in self.factors}

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
