"""Buckets of small layers: the torch engine's passes on concatenated copies, a few operations per bucket.

Where the ``foreach`` engine masks on the device (CUDA), running each layer's reductions and program on
its own costs a few dozen kernel launches per layer: host-bound on a model of many small tensors. Here
consecutive small layers of one dtype are copied into one vector per name (one multi-tensor copy), the
measurement's pre-program and the reductions run once per bucket, and the program runs once per bucket,
its outputs written to new vectors; where a layer is skipped the old values are kept by one
``torch.where`` per written vector, and the results are copied back into the layers' tensors with one
multi-tensor copy. The arithmetic is the per-layer program's, element by element; only the order of
the additions inside a layer's sums differs.

Both passes hold each layer padded to whole blocks of a few hundred elements (:class:`Layout`), as a
``[blocks, block]`` view. A layer's sums are taken in two levels, in a fixed order (deterministic): over
each block, then over each layer's blocks. The program's coefficients are ``[blocks, 1]`` columns, one
row per block, which broadcast over the blocks' elements: nothing of the bucket's size is gathered.
(Measured on ResNet-50 on an H200, ``torch.segment_reduce`` over whole layers gave the GPU one thread
block per layer, 7 ms a step, and ``torch.repeat_interleave`` of the coefficients over the elements
wrote each layer's run from one thread, 15 ms a step.)

The temporaries of a bucket are a few vectors of its size, so buckets are capped (:data:`CONFIG`); a
layer larger than the cap runs on its own, as before.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.engines.runtime import Runtime
from kalmanopt.program import Assign, PreparedProgram, Reduction, Scalar, evaluate_vector, vectors_read

__all__ = ["CONFIG", "Layout", "layout", "plan_buckets", "bucket_sums", "run_bucket_program"]

#: the most elements a bucket holds (and so the largest layer that joins one; 0 turns buckets off), and
#: the most layers
CONFIG = {"elements": 1 << 23, "layers": 256}

#: the bounds of a bucket's block (:class:`Layout`), and the most blocks of one layer
BLOCK_MIN, BLOCK_MAX, MOST_BLOCKS = 32, 1024, 1024


def plan_buckets(envs: Sequence[Mapping[str, Tensor]]) -> list[tuple[int, int]]:
    """The ``[start, stop)`` index ranges of the buckets: consecutive layers whose vectors share a dtype and a
    device, up to ``CONFIG["elements"]`` elements and ``CONFIG["layers"]`` layers together; a larger layer is
    a range of its own."""
    cap, most = int(CONFIG["elements"]), int(CONFIG["layers"])
    out: list[tuple[int, int]] = []
    start, total, kind = 0, 0, None
    for i, env in enumerate(envs):
        theta = env["theta"]
        n = theta.numel()
        this = (theta.dtype, theta.device)
        if i > start and (this != kind or total + n > cap or n > cap or i - start >= most):
            out.append((start, i))
            start, total = i, 0
        kind = this
        total += n
    if envs:
        out.append((start, len(envs)))
    return out


class Layout:
    """Where a bucket's layers lie in its concatenated vectors (made once per list of sizes and device).

    Both passes concatenate each layer padded to whole blocks of :attr:`block` elements, so that its sums
    are a sum over each block (one reduction of a ``[blocks, block]`` view) and then over each layer's
    blocks (a gather through :attr:`block_index`), the padding zeroed in the summands; and so that a
    per-layer coefficient is a ``[blocks, 1]`` column (a gather through :attr:`block_layer`). The block is
    a power of two near the bucket's mean layer size, from ``BLOCK_MIN`` to ``BLOCK_MAX`` (the padding
    stays below the bucket's size), raised where the largest layer would have more than ``MOST_BLOCKS``
    blocks.

    Attributes:
        sizes: the layers' sizes.
        block: the elements of one block.
        pads: the zeros after each layer in the padded vectors.
        padded_sizes: each layer's size with its padding (whole blocks).
        pad_index: where the padded vectors hold padding (int64, on the device; fewer than ``BLOCK_MAX`` per
            layer).
        block_index: ``[layers, most blocks]``: each layer's blocks, then the index of a zero column.
        block_layer: ``[blocks]``: the layer of each block (int64, on the device).
    """

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        self.sizes = list(sizes)
        mean = sum(self.sizes) // max(len(self.sizes), 1)
        block = min(max(BLOCK_MIN, 1 << max(mean.bit_length() - 1, 0)), BLOCK_MAX)
        while -(-max(self.sizes, default=0) // block) > MOST_BLOCKS:
            block *= 2
        self.block = block
        blocks = [-(-n // block) for n in self.sizes]
        self.padded_sizes = [b * block for b in blocks]
        self.pads = [padded - n for padded, n in zip(self.padded_sizes, self.sizes)]
        n_blocks = sum(blocks)
        width = max(blocks, default=0) or 1
        rows, first = [], 0
        for b in blocks:
            rows.append(list(range(first, first + b)) + [n_blocks] * (width - b))
            first += b
        self.block_index = _to_device(rows, torch.int64, device)
        padding = [i for offset, n, pad in zip(_running_sums(self.padded_sizes), self.sizes, self.pads)
                   for i in range(offset + n, offset + n + pad)]
        self.pad_index = _to_device(padding, torch.int64, device)
        self.block_layer = _to_device([li for li, b in enumerate(blocks) for _ in range(b)], torch.int64, device)

    def padded(self, envs: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> dict[str, Tensor]:
        """The layers' vectors ``keys`` in the padded layout (flat; the padding zeros).

        One multi-tensor copy for all of them: ``torch.cat`` of a bucket's few hundred pieces ran at a
        fifth of the copy bandwidth on an H200 (44 % of the ResNet-50 step's GPU time)."""
        out, dst, src = {}, [], []
        for k in keys:
            first = envs[0][k]
            buffer = out[k] = first.new_empty(sum(self.padded_sizes))
            if self.pad_index.numel():
                buffer.index_fill_(0, self.pad_index, 0.0)
            dst += self.unpadded(buffer)
            src += [env[k] for env in envs]
        if dst:
            torch._foreach_copy_(dst, src)
        return out

    def layer_sums(self, values: Sequence[Tensor]) -> Tensor:
        """``[layers, len(values)]``: the sums over each layer of ``values`` (vectors in the padded layout,
        flat or ``[blocks, block]``; their padding is overwritten with zeros)."""
        partials = []
        for value in values:
            flat = value.reshape(-1)
            if self.pad_index.numel():  # (what the program made of the padding's zeros, NaN included, goes)
                flat.index_fill_(0, self.pad_index, 0.0)
            partials.append(flat.view(-1, self.block).sum(-1))
        partial = torch.stack(partials)  # (small: one value per block)
        partial = torch.cat([partial, partial.new_zeros(len(partials), 1)], 1)
        return partial[:, self.block_index].sum(-1).t()

    def blocks(self, padded: Tensor) -> Tensor:
        """A padded vector as the ``[blocks, block]`` view the program runs on."""
        return padded.view(-1, self.block)

    def unpadded(self, blocks: Tensor) -> list[Tensor]:
        """Each layer's values of a ``[blocks, block]`` tensor (views, the padding left out)."""
        pieces = blocks.view(-1).split(self.padded_sizes)
        return [piece[:n] for piece, n in zip(pieces, self.sizes)]


def _running_sums(values: Sequence[int]) -> list[int]:
    """[0, v₀, v₀ + v₁, …]."""
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    # from pinned memory, without blocking: the copy does not wait for the work queued before it
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


def layout(runtime: Runtime, sizes: Sequence[int], device: torch.device) -> Layout:
    """The :class:`Layout` of a bucket of layers of ``sizes`` on ``device``, cached in the optimizer's runtime
    (a step asks again)."""
    return runtime.cached("layouts", (tuple(sizes), str(device)), lambda: Layout(sizes, device))


def _keys(envs: Sequence[Mapping[str, Tensor]], exprs: Sequence[Any]) -> list[str]:
    """The layer vectors the expressions read (not the temporaries a program defines)."""
    return [v.key for v in vectors_read(exprs) if v.key in envs[0]]


def bucket_sums(envs: Sequence[Mapping[str, Tensor]], pre: Sequence[Assign], pre_program: PreparedProgram | None,
                reductions: Sequence[Reduction], hp: Mapping[str, Scalar], where: Layout, like: Tensor) -> Tensor:
    """``[layers, reductions]``: each layer's sums of the reductions, the pre-program (H) run first."""
    env = where.padded(envs, _keys(envs, [a.expr for a in pre] + [r.expr for r in reductions]))
    if pre_program is not None:
        pre_program.run(env, hp)
    values = [evaluate_vector(r.expr, env, hp) for r in reductions]
    vectors = [v for v in values if isinstance(v, Tensor) and v.dim()]
    if not values:
        return like.new_zeros(len(envs), 0)
    sums = iter(where.layer_sums(vectors).to(like).unbind(1) if vectors else ())
    # (a reduction of no vector sums to zero, as the layer-by-layer pass's; columns stacked, not indexed by a
    # list: a list index is copied to the device from pageable memory, which synchronises)
    return torch.stack([next(sums) if isinstance(v, Tensor) and v.dim() else like.new_zeros(len(envs))
                        for v in values], 1)


def run_bucket_program(envs: Sequence[dict[str, Tensor]], pre: Sequence[Assign],
                       pre_program: PreparedProgram | None, program: PreparedProgram, hp: Mapping[str, Scalar],
                       names: Sequence[str], table: Tensor, keep: Tensor, where: Layout) -> None:
    """Run ``program`` on a bucket's layers where ``keep`` (per layer), writing its outputs back in place.

    ``table`` holds the bucket's rows of the coefficient columns ``names``; ``where`` its layout.
    """
    reads = [a.expr for a in pre] + [a.expr for a in program.program] + [a.target for a in program.program]
    env = {k: where.blocks(v) for k, v in where.padded(envs, _keys(envs, reads)).items()}
    if pre_program is not None:
        pre_program.run(env, hp)
    coefs: dict[str, Scalar] = dict(hp)
    for j, name in enumerate(names):
        coefs[name] = table[:, j].index_select(0, where.block_layer).unsqueeze(1)
    outputs = [k for k in program.outputs if k in env]
    old = {k: env[k] for k in outputs}
    program.run(env, coefs, in_place=False)  # (the old values stay in ``old``, for the skipped layers)
    kept = keep.index_select(0, where.block_layer).unsqueeze(1)
    dst, src = [], []
    olds = {id(t) for t in old.values()}
    for k in outputs:
        new = env[k]
        # written in place where no output's old values live in it (a new vector, or an input's copy); an
        # output that is a plain copy of another's old values gets a new vector
        kept_new = torch.where(kept, new, old[k], out=new) if id(new) not in olds else torch.where(kept, new, old[k])
        dst += [e[k] for e in envs]
        src += where.unpadded(kept_new)
    if dst:
        torch._foreach_copy_(dst, src)
