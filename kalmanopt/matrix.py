"""Matrix stages: what a part does to a layer read as a matrix, written once, run on every engine.

The element-wise programs of :mod:`kalmanopt.program` see a layer as a flat vector. A structured
covariance (a Kronecker factor along the rows and one along the columns, a factored diagonal) needs the
layer as the m × n matrix it is (:func:`kalmanopt.state.matricised_shape`) and small per-layer factor
matrices (:class:`~kalmanopt.state.FactorState`). A part declares such work as a :class:`MatrixStage`:

- ``when="before"`` runs ahead of the step's first pass: it reads the layer's vectors (``g``, ``theta``,
  the measurement's ``H``, state vectors) and its factors, and writes workspace vectors
  (``VectorState(..., workspace=True)``) that the reductions and element-wise programs then read like any
  state vector — so the fused engine keeps its passes fused and the matrix work runs between them;
- ``when="after"`` runs after the element-wise pass: it also reads this step's coefficient columns
  (``S``, ...), which layers took the update (:attr:`MatrixBlock.keep`) and what the ``before`` stage of
  the same step left in :attr:`MatrixBlock.carry`.

Either kind may set new factors: a later stage of the same step reads them, and they are committed after
the element-wise pass, only where the layer took the update (a skipped step changes no factor). A stage
may also read the layers' scalar state (``scalars=("k",)``: the number of updates, say) as ``[b]`` columns.

A stage function receives a :class:`MatrixBlock`: the layers of one group that share a matrix shape (and
factor shapes), stacked along a leading dimension, so that its matmuls, ``eigh`` or Newton–Schulz
iterations are batched torch operations. ``every`` runs a stage only every k-th step (a factor refresh, as
Shampoo and SOAP do); a stage that does not run leaves its outputs and factors as they were.

Only torch operations on the block's tensors: no Python loop over layers, no host synchronisation. A
factor kept as its diagonal (a side larger than its ``max_size``, a layer that is not a matrix) arrives as
a ``[b, k]`` tensor instead of ``[b, k, k]``: :func:`left` and :func:`right` multiply by either form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

__all__ = ["MatrixStage", "MatrixBlock", "left", "right", "is_dense", "frobenius2", "trace", "add_identity",
           "STAGE_TIMES"]

#: when a matrix stage runs in a step
STAGE_TIMES = ("before", "after")


@dataclass
class MatrixBlock:
    """The layers of one group that share a matrix shape, stacked: what a stage function reads and fills.

    Attributes:
        m, n: the shape every layer of the block is read as.
        matrix: whether the layers are matrices (else vectors or scalars read as (numel, 1) columns).
        hp: the group's hyper-parameters (Python values).
        x: the vectors the stage reads, ``[b, m, n]`` each (read only: a workspace vector is the block's buffer).
        buffers: the block's workspace vectors as ``[b, m, n]`` buffers whose rows are the layers' entries (where
            the layers allow it): a stage may fill one in place (``torch.mul(..., out=block.buffers["D"])``) and
            set ``block.out["D"]`` to it, saving a copy.
        factors: the factors the stage reads, ``[b, k, k]`` (dense) or ``[b, k]`` (a diagonal or a vector); a
            factor set by an earlier stage of this step has its new value here.
        scalars: the layers' scalar state the block's stages declare, ``[b]`` each, as it was before the step.
        coef: (``after`` stages) this step's coefficient columns, ``[b]`` each.
        keep: (``after`` stages) ``[b]`` bool, the layers that took this step's update.
        carry: what the step's ``before`` stage left for its ``after`` stage (tensors with the layers along
            their first dimension; dropped after the step).

    Outputs the stage fills:

    Attributes:
        out: workspace vectors, ``[b, m, n]`` each, by name.
        new_factors: new factor values, by name, shaped as in ``factors``.
    """

    m: int
    n: int
    matrix: bool
    hp: Mapping[str, Any]
    x: dict[str, Tensor] = field(default_factory=dict)
    factors: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Tensor] = field(default_factory=dict)
    coef: dict[str, Tensor] = field(default_factory=dict)
    keep: Tensor | None = None
    carry: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    out: dict[str, Tensor] = field(default_factory=dict)
    new_factors: dict[str, Tensor] = field(default_factory=dict)

    def per_layer(self, column: Tensor) -> Tensor:
        """A ``[b]`` column broadcast against ``[b, m, n]`` tensors (``[b, 1, 1]``)."""
        return column.reshape(-1, 1, 1)


@dataclass(frozen=True)
class MatrixStage:
    """A part's work on layers read as matrices (see the module's docstring).

    Attributes:
        name: a name for messages.
        run: the stage function, ``run(block)``; it fills ``block.out`` and ``block.new_factors``.
        when: ``"before"`` the step's first pass or ``"after"`` its element-wise pass.
        reads: the vectors it reads (``"g"``, ``"theta"``, ``"H"``, or declared state vectors).
        writes: the workspace vectors it writes (declared ``VectorState(..., workspace=True)``).
        factors: the factors it reads (and may set), declared as :class:`~kalmanopt.state.FactorState`.
        coefficients: (``after``) the coefficient columns it reads.
        every: run it every k-th step (an int, or the name of a hyper-parameter); 1: every step.
        scalars: the per-layer scalar state it reads (declared :class:`~kalmanopt.state.ScalarState`).
    """

    name: str
    run: Callable[[MatrixBlock], None]
    when: str = "before"
    reads: tuple[str, ...] = ("g",)
    writes: tuple[str, ...] = ()
    factors: tuple[str, ...] = ()
    coefficients: tuple[str, ...] = ()
    every: int | str = 1
    scalars: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.when not in STAGE_TIMES:
            raise ValueError(f"MatrixStage {self.name!r}: when must be one of {STAGE_TIMES}, got {self.when!r}")
        if self.when == "before" and self.coefficients:
            raise ValueError(f"MatrixStage {self.name!r} runs before the coefficients exist, so it cannot read "
                             f"{list(self.coefficients)}; read them in a stage with when='after'")

    def interval(self, hp: Mapping[str, Any]) -> int:
        """The stage's interval in steps for a group's ``hp`` (at least 1)."""
        every = self.every
        value = int(hp[every]) if isinstance(every, str) else int(every)
        if value < 1:
            raise ValueError(f"MatrixStage {self.name!r}: every={value} must be at least 1 step")
        return value


# ---------------------------------------------------------------------- helpers for stage functions
def is_dense(factor: Tensor) -> bool:
    """Whether a stacked factor is a dense matrix ``[b, k, k]`` (else a diagonal ``[b, k]``)."""
    return factor.dim() == 3


def left(A: Tensor, X: Tensor) -> Tensor:
    """A X for a stacked factor A (``[b, m, m]`` or its diagonal ``[b, m]``) and X ``[b, m, n]``."""
    return A @ X if is_dense(A) else A[..., :, None] * X


def right(X: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """X B for X ``[b, m, n]`` and a stacked factor B (``[b, n, n]`` or its diagonal ``[b, n]``), into ``out`` if
    given."""
    if out is None:
        return X @ B if is_dense(B) else X * B[..., None, :]
    return torch.matmul(X, B, out=out) if is_dense(B) else torch.mul(X, B[..., None, :], out=out)


def frobenius2(A: Tensor) -> Tensor:
    """‖A‖²_F per layer (``[b]``), of a dense factor or of the diagonal matrix a vector stands for."""
    return A.square().sum(dim=(-2, -1)) if is_dense(A) else A.square().sum(-1)


def trace(A: Tensor) -> Tensor:
    """tr A per layer (``[b]``)."""
    return A.diagonal(dim1=-2, dim2=-1).sum(-1) if is_dense(A) else A.sum(-1)


def add_identity(A: Tensor, c: Tensor | float) -> Tensor:
    """A + c I per layer (``c``: ``[b]``, or one number for every layer)."""
    if not is_dense(A):
        return A + (c[:, None] if isinstance(c, Tensor) else float(c))
    X = A.clone()
    diagonal = X.diagonal(dim1=-2, dim2=-1)  # (a view: the update lands in X)
    diagonal.add_(c[:, None] if isinstance(c, Tensor) else float(c))
    return X
