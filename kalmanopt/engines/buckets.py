"""Buckets of small layers: the torch engine's passes on concatenated copies, a few operations per bucket.

Where the ``foreach`` engine masks on the device (CUDA), running each layer's reductions and program on
its own costs a few dozen kernel launches per layer: host-bound on a model of many small tensors. Here
consecutive small layers of one dtype are concatenated into one vector per name, the measurement's
pre-program and the reductions run once per bucket (sums per layer by ``torch.segment_reduce``), and the
program runs once per bucket with each coefficient column repeated over its layer's elements; a skipped
layer's values are restored with one ``torch.where``, and the results are copied back into the layers'
tensors with one multi-tensor copy per written vector. The arithmetic is the per-layer program's,
element by element; only the order of the additions inside a layer's sums differs.

The temporaries of a bucket are a few vectors of its size, so buckets are capped (:data:`CONFIG`); a
layer larger than the cap runs on its own, as before.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.program import Assign, CompiledProgram, Reduction, Scalar, evaluate_vector, vectors_read

__all__ = ["CONFIG", "plan_buckets", "bucket_sums", "run_bucket_program"]

#: the most elements a bucket holds (and so the largest layer that joins one); 0 turns buckets off
CONFIG = {"elements": 1 << 23}


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


def _concatenated(envs: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> dict[str, Tensor]:
    return {k: torch.cat([env[k] for env in envs]) for k in keys}


def _keys(envs: Sequence[Mapping[str, Tensor]], exprs: Sequence[Any]) -> list[str]:
    """The layer vectors the expressions read (not the temporaries a program defines)."""
    return [v.key for v in vectors_read(exprs) if v.key in envs[0]]


def bucket_sums(envs: Sequence[Mapping[str, Tensor]], pre: Sequence[Assign], pre_program: CompiledProgram | None,
                reductions: Sequence[Reduction], hp: Mapping[str, Scalar], lengths: Tensor, like: Tensor) -> Tensor:
    """``[layers, reductions]``: each layer's sums of the reductions, the pre-program (H) run first."""
    env = _concatenated(envs, _keys(envs, [a.expr for a in pre] + [r.expr for r in reductions]))
    if pre_program is not None:
        pre_program.run(env, hp)
    cols = []
    for r in reductions:
        value = evaluate_vector(r.expr, env, hp)
        if isinstance(value, Tensor) and value.dim():
            cols.append(torch.segment_reduce(value, "sum", lengths=lengths, unsafe=True).to(like))
        else:
            cols.append(like.new_zeros(len(envs)))
    return torch.stack(cols, 1) if cols else like.new_zeros(len(envs), 0)


def run_bucket_program(envs: Sequence[dict[str, Tensor]], pre: Sequence[Assign],
                       pre_program: CompiledProgram | None, program: CompiledProgram, hp: Mapping[str, Scalar],
                       names: Sequence[str], table: Tensor, keep: Tensor, lengths: Tensor, sizes: list[int]) -> None:
    """Run ``program`` on a bucket's layers where ``keep`` (per layer), writing its outputs back in place.

    ``table`` holds the bucket's rows of the coefficient columns ``names``; ``lengths`` its layers' sizes on
    the device (``sizes`` on the host).
    """
    reads = [a.expr for a in pre] + [a.expr for a in program.program] + [a.target for a in program.program]
    env = _concatenated(envs, _keys(envs, reads))
    if pre_program is not None:
        pre_program.run(env, hp)
    n = sum(sizes)
    coefs: dict[str, Scalar] = dict(hp)
    for j, name in enumerate(names):
        coefs[name] = torch.repeat_interleave(table[:, j], lengths, output_size=n)
    outputs = [k for k in program.outputs if k in env]
    old = {k: env[k].clone() for k in outputs}
    program.run(env, coefs)
    kept = torch.repeat_interleave(keep, lengths, output_size=n)
    for k in outputs:
        new = torch.where(kept, env[k], old[k])
        torch._foreach_copy_([e[k] for e in envs], list(new.split(sizes)))
