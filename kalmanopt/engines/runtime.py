"""The one owner of an optimizer's step-to-step bookkeeping: caches, flags and deferred warnings.

Engines are stateless executors of a :class:`~kalmanopt.plan.StepPlan`: whatever a step remembers for the
next one (the compiled plans, device copies of layer sizes, bucket layouts, the fused engine's kernel
slots and steady plans, a captured CUDA graph, the deferred non-finite warnings, which warnings were shown,
the last step's diagnostics, whether a predict is standing) lives on the :class:`Runtime` that the
optimizer creates and owns (``opt.runtime``) and hands to the engines in each group's context. Nothing of
the kind is kept in module globals or keyed by ``id()``; an optimizer's caches go with it.

What *is* kept process-wide are caches of code: the Triton source generated for a declaration
(:func:`kalmanopt.engines.triton_source.kernels_for`) and the ``torch.compile``\\ d coefficient functions
(:data:`kalmanopt.engines.compiled.CODE_CACHE`), both pure functions of the parts' declarations, as torch
keeps its own compiled kernels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from kalmanopt.scratch import Scratch

__all__ = ["Runtime", "GroupRuntime", "Watch", "OptimizerView"]

#: bounds of the caches (a few entries per step are in use; a changed model starts afresh)
_MOST = 256


class Watch:
    """The deferred warnings of a step on a device: the codes seen since the last report, and their copies."""

    def __init__(self, device: torch.device) -> None:
        self.kinds = torch.zeros((), dtype=torch.int32, device=device)
        self.host = torch.zeros((), dtype=torch.int32).pin_memory() if device.type == "cuda" \
            else torch.zeros((), dtype=torch.int32)
        self.events: list[Any] = []


@dataclass
class GroupRuntime:
    """What one parameter group's steps keep: the fused engine's steady plan, its staging buffers, a ridden
    predict's sums, the engines' verdicts. Valid while the group (the dict in ``param_groups``) is the same."""

    group: dict
    steady: Any = None
    ridden: Any = None
    staging: dict[tuple, Any] = field(default_factory=dict)
    verdicts: dict[tuple, str | None] = field(default_factory=dict)


class Runtime:
    """An optimizer's step-to-step bookkeeping (see the module's docstring).

    Attributes:
        predicted: a predict has run that no update consumed yet.
        warned: the kinds of warning already shown (each is shown once).
        diagnostics: the last update's per-layer internals (device tensors), by layer name.
        loss_count: this process's number of samples in the last loss (several processes weigh by it).
        watch: the deferred non-finite warnings (CUDA), or None.
        graph: the captured CUDA graph of a steady step, or None.
        structure_seen: the parameters' and state's layout the last structure check left, or None.
        scratch: the temporaries the torch engines borrow on the CPU (:class:`~kalmanopt.scratch.Scratch`).
    """

    def __init__(self) -> None:
        self.predicted = False
        self.warned: set[str] = set()
        self.diagnostics: dict[str, dict[str, Tensor]] = {}
        self.loss_count = 1
        self.watch: Watch | None = None
        self.graph: Any = None
        self.structure_seen: tuple | None = None  # (kalmanopt.structure: the layout its last check left)
        self._groups: list[GroupRuntime | None] = []
        self._plans: dict[tuple, Any] = {}
        self._int64: dict[tuple, Tensor] = {}
        self._bits: dict[tuple, Tensor] = {}
        self._layouts: dict[tuple, Any] = {}
        self._slots: dict[tuple, Tensor] = {}
        self._chunks: dict[tuple, Any] = {}
        self.scratch = Scratch()

    # ------------------------------------------------------------------ what survives a copy
    def carried(self) -> dict[str, Any]:
        """What a copy of the optimizer (``deepcopy``, pickle) keeps: the flags, not the caches."""
        return {"predicted": self.predicted, "warned": set(self.warned), "diagnostics": dict(self.diagnostics),
                "loss_count": self.loss_count}

    @classmethod
    def from_carried(cls, carried: dict[str, Any]) -> Runtime:
        """A runtime with the flags of :meth:`carried` and empty caches."""
        runtime = cls()
        for name, value in carried.items():
            setattr(runtime, name, value)
        return runtime

    def forget_caches(self) -> None:
        """Drop every cache (a loaded state dict or a changed group); flags and warnings stay."""
        self._groups.clear()
        self._plans.clear()
        self._slots.clear()
        self._chunks.clear()
        self.scratch.clear()
        self.graph = None

    # ------------------------------------------------------------------ per group
    def group(self, index: int, group: dict) -> GroupRuntime:
        """The bookkeeping of group ``index``, fresh if the group there is not the one it was kept for."""
        while len(self._groups) <= index:
            self._groups.append(None)
        kept = self._groups[index]
        if kept is None or kept.group is not group:
            kept = self._groups[index] = GroupRuntime(group)
        return kept

    # ------------------------------------------------------------------ caches by value
    def cached(self, store: str, key: tuple, make: Callable[[], Any]) -> Any:
        """The entry ``key`` of the cache ``store`` (``"plans"``, ``"layouts"``, ``"chunks"``), made on a miss."""
        cache: dict = getattr(self, f"_{store}")
        found = cache.get(key)
        if found is None:
            if len(cache) >= _MOST:
                cache.clear()
            found = cache[key] = make()
        return found

    def int64(self, values: Sequence[int], device: torch.device) -> Tensor:
        """Integers (layer sizes, row indices) as an int64 tensor on ``device``, cached by value and never to be
        written: a step asks for the same ones again, and a copy to the device each time would wait for the
        work queued before it (the first one is copied from pinned memory, without blocking)."""
        key = (tuple(values), str(device))
        found = self._int64.get(key)
        if found is None:
            host = torch.tensor(list(values), dtype=torch.int64)
            found = (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)
            if len(self._int64) >= _MOST:
                self._int64.clear()
            self._int64[key] = found
        return found

    def code_bits(self, bits: Sequence[int], device: torch.device) -> Tensor:
        """The bits of a step code's checks (``CODE_LOSS``, ...) as an int32 tensor on ``device``, copied once
        and kept for the optimizer's life (a captured step reads it: a handful of entries, never dropped)."""
        key = (tuple(bits), str(device))
        found = self._bits.get(key)
        if found is None:
            host = torch.tensor(list(bits), dtype=torch.int32)
            found = self._bits[key] = (host.pin_memory() if device.type == "cuda" else host).to(device,
                                                                                                  non_blocking=True)
        return found

    def slot_table(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """A fused kernel's offset table, by the addresses of its tensors (only the table is kept)."""
        return self.cached("slots", key, make)

    def warn_once(self, kind: str, message: str, stacklevel: int = 4) -> None:
        """Issue a ``RuntimeWarning`` the first time an event of ``kind`` happens to this optimizer."""
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(f"{message}; this warning is shown once per kind ({kind})", RuntimeWarning,
                          stacklevel=stacklevel)

    def watch_on(self, device: torch.device) -> Watch:
        """The deferred-warning watch on ``device`` (a new one where the device changed)."""
        if self.watch is None or self.watch.kinds.device != device:
            self.watch = Watch(device)
        return self.watch


class OptimizerView(Protocol):
    """What the engines read of the optimizer that drives them (:class:`~kalmanopt.KalmanOptimizer`): its
    public attributes and methods only, so that the engines sit below it and import nothing of it."""

    filter: Any
    param_groups: list[dict[str, Any]]
    state: Mapping[Any, Any]
    runtime: Runtime
    strict: bool
    track_diagnostics: bool
    loss_statistic: str
    process_group: Any

    def group_state(self, index: int) -> dict: ...

    def layers(self, index: int) -> list[Any]: ...

    def gradients(self) -> list[Tensor]: ...
