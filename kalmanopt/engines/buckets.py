"""Buckets of small layers: the torch engine's passes on concatenated copies, a few operations per bucket.

Where the ``foreach`` engine masks on the device (CUDA), running each layer's reductions and program on
its own costs a few dozen kernel launches per layer: host-bound on a model of many small tensors. Here
consecutive small layers of one dtype are concatenated into one vector per name, the measurement's
pre-program and the reductions run once per bucket, and the program runs once per bucket with each
coefficient column spread over its layer's elements; a skipped layer's values are restored with one
``torch.where``, and the results are copied back into the layers' tensors with one multi-tensor copy
per written vector. The arithmetic is the per-layer program's, element by element; only the order of
the additions inside a layer's sums differs.

A layer's sums are taken in two levels, both by ``torch.segment_reduce`` (deterministic): over pieces of
at most :data:`PIECE` elements that never straddle two layers, then over each layer's pieces. One level
over whole layers gives the GPU one block per layer (a bucket of a few large layers ran on a handful of
multiprocessors: 7 ms a step on ResNet-50). Coefficients are spread by a gather through each element's
layer index (``torch.searchsorted`` over the layers' ends): ``torch.repeat_interleave`` writes each
layer's run from one thread (15 ms a step on ResNet-50).

The temporaries of a bucket are a few vectors of its size, so buckets are capped (:data:`CONFIG`); a
layer larger than the cap runs on its own, as before.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.program import Assign, CompiledProgram, Reduction, Scalar, evaluate_vector, vectors_read

__all__ = ["CONFIG", "PIECE", "Layout", "layout", "plan_buckets", "bucket_sums", "run_bucket_program"]

#: the most elements a bucket holds (and so the largest layer that joins one); 0 turns buckets off
CONFIG = {"elements": 1 << 23}

#: the most elements of one first-level piece of a layer's sums
PIECE = 1 << 13


def plan_buckets(envs: Sequence[Mapping[str, Tensor]]) -> list[tuple[int, int]]:
    """The ``[start, stop)`` index ranges of the buckets: consecutive layers whose vectors share a dtype and a
    device, up to ``CONFIG["elements"]`` elements together; a larger layer is a range of its own."""
    cap = int(CONFIG["elements"])
    out: list[tuple[int, int]] = []
    start, total, kind = 0, 0, None
    for i, env in enumerate(envs):
        theta = env["theta"]
        n = theta.numel()
        this = (theta.dtype, theta.device)
        if i > start and (this != kind or total + n > cap or n > cap):
            out.append((start, i))
            start, total = i, 0
        kind = this
        total += n
    if envs:
        out.append((start, len(envs)))
    return out


class Layout:
    """Where a bucket's layers lie in its concatenated vectors (made once per list of sizes and device).

    Attributes:
        sizes: the layers' sizes.
        ends: the layers' end offsets (int32, on the device), for :meth:`layer_index`.
        pieces: the sizes of the first-level pieces of the sums (int64, on the device).
        counts: how many pieces each layer has (int64, on the device; 0 for an empty layer).
    """

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        self.sizes = list(sizes)
        self.total = sum(self.sizes)
        pieces: list[int] = []
        counts: list[int] = []
        for n in self.sizes:
            full, rest = divmod(n, PIECE)
            pieces += [PIECE] * full + ([rest] if rest else [])
            counts.append(full + (1 if rest else 0))
        ends, acc = [], 0
        for n in self.sizes:
            acc += n
            ends.append(acc)
        self.ends = _to_device(ends, torch.int32, device)
        self.pieces = _to_device(pieces, torch.int64, device)
        self.counts = _to_device(counts, torch.int64, device)

    def layer_sums(self, value: Tensor) -> Tensor:
        """``[layers]``: the sum of ``value`` (the bucket's concatenated vector) over each layer."""
        partial = torch.segment_reduce(value, "sum", lengths=self.pieces, unsafe=True)
        return torch.segment_reduce(partial, "sum", lengths=self.counts, unsafe=True)

    def layer_index(self) -> Tensor:
        """``[elements]``: the index of each element's layer (int32, a temporary of the bucket's size)."""
        elements = torch.arange(self.total, dtype=torch.int32, device=self.ends.device)
        return torch.searchsorted(self.ends, elements, right=True, out_int32=True)


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    # from pinned memory, without blocking: the copy does not wait for the work queued before it
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


_LAYOUTS: dict[tuple, Layout] = {}


def layout(sizes: Sequence[int], device: torch.device) -> Layout:
    """The :class:`Layout` of a bucket of layers of ``sizes`` on ``device`` (cached: a step asks again)."""
    key = (tuple(sizes), str(device))
    found = _LAYOUTS.get(key)
    if found is None:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        found = _LAYOUTS[key] = Layout(sizes, device)
    return found


def _concatenated(envs: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> dict[str, Tensor]:
    return {k: torch.cat([env[k] for env in envs]) for k in keys}


def _keys(envs: Sequence[Mapping[str, Tensor]], exprs: Sequence[Any]) -> list[str]:
    """The layer vectors the expressions read (not the temporaries a program defines)."""
    return [v.key for v in vectors_read(exprs) if v.key in envs[0]]


def bucket_sums(envs: Sequence[Mapping[str, Tensor]], pre: Sequence[Assign], pre_program: CompiledProgram | None,
                reductions: Sequence[Reduction], hp: Mapping[str, Scalar], where: Layout, like: Tensor) -> Tensor:
    """``[layers, reductions]``: each layer's sums of the reductions, the pre-program (H) run first."""
    env = _concatenated(envs, _keys(envs, [a.expr for a in pre] + [r.expr for r in reductions]))
    if pre_program is not None:
        pre_program.run(env, hp)
    cols = []
    for r in reductions:
        value = evaluate_vector(r.expr, env, hp)
        if isinstance(value, Tensor) and value.dim():
            cols.append(where.layer_sums(value).to(like))
        else:
            cols.append(like.new_zeros(len(envs)))
    return torch.stack(cols, 1) if cols else like.new_zeros(len(envs), 0)


def run_bucket_program(envs: Sequence[dict[str, Tensor]], pre: Sequence[Assign],
                       pre_program: CompiledProgram | None, program: CompiledProgram, hp: Mapping[str, Scalar],
                       names: Sequence[str], table: Tensor, keep: Tensor, where: Layout) -> None:
    """Run ``program`` on a bucket's layers where ``keep`` (per layer), writing its outputs back in place.

    ``table`` holds the bucket's rows of the coefficient columns ``names``; ``where`` its layout.
    """
    reads = [a.expr for a in pre] + [a.expr for a in program.program] + [a.target for a in program.program]
    env = _concatenated(envs, _keys(envs, reads))
    if pre_program is not None:
        pre_program.run(env, hp)
    index = where.layer_index()
    coefs: dict[str, Scalar] = dict(hp)
    for j, name in enumerate(names):
        coefs[name] = table[:, j].index_select(0, index)
    outputs = [k for k in program.outputs if k in env]
    old = {k: env[k].clone() for k in outputs}
    program.run(env, coefs)
    kept = keep.index_select(0, index)
    for k in outputs:
        new = torch.where(kept, env[k], old[k])
        torch._foreach_copy_([e[k] for e in envs], list(new.split(where.sizes)))
