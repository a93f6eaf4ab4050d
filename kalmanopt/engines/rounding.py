"""Stochastic rounding of filter state into bfloat16: the same bits from every engine.

With ``state_dtype="bfloat16"`` a group's per-layer vectors are stored in bfloat16 and computed in float32.
Each write rounds a float32 value ``x`` to one of its two bfloat16 neighbours, up with probability equal to
the distance from the lower one (in units of the gap between them), so that the stored value is ``x`` in
expectation: a small update that round-to-nearest would lose every step (``|Δ| < ½ ulp``) survives on
average. In bits: add 16 random bits to the low half of ``x``'s float32 pattern and cut the low half off.

The random bits are a counter-based hash, not a generator's stream, so that nothing is kept between steps
beyond the group's step counter (a checkpoint resumes the same roundings), every rank of a replicated model
draws the same bits (DDP replicas stay equal), and the torch engines and the fused kernels round alike::

    key(step, salt, layer, name) = mix(mix(mix(step ^ salt·φ) ^ layer) ^ crc32(name))
    bits(i) = mix(i ^ key) & 0xFFFF            (i: the element's index in the layer's vector)

``mix`` is a 32-bit integer finaliser (xor-shift, multiply, xor-shift, multiply, xor-shift), ``φ`` the
golden-ratio constant 0x9E3779B9, all arithmetic modulo 2³². ``step`` is the group's ``steps`` counter
(the updates taken), ``salt`` ``2 · group + phase`` (0 for an update's writes, 1 for a predict's), ``layer``
the layer's position among those the pass writes. The fused engine's Triton source
(:mod:`kalmanopt.engines.triton_source`) writes the same formula with the constants here.

NaN stays NaN; a value beyond bfloat16's largest finite one may round to infinity (as round-to-nearest
does from half a gap further). float64 arithmetic is rounded to float32 first.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = ["MIX", "GOLDEN", "CPU_PIECE", "mix32", "rounding_key", "name_salt", "random_bits", "round_into",
           "RoundingKeys"]

#: the finaliser's shifts and multipliers: ``x ^= x >> 16; x *= M1; x ^= x >> 15; x *= M2; x ^= x >> 15``
MIX = (16, 0x21F0AAAD, 15, 0xD35A2D97, 15)
#: the golden-ratio constant the salt is spread with
GOLDEN = 0x9E3779B9
_M32 = 0xFFFFFFFF


def _signed32(value: int) -> int:
    """A 32-bit pattern as the int32 number with the same bits."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _mix_patterns_(x: Tensor) -> Tensor:
    """The finaliser applied in place to int32 bit patterns, whose products wrap modulo 2³² as the kernels'
    uint32 ones (torch's ``>>`` on int32 copies the sign bit: the shifts are masked to logical ones)."""
    s1, m1, s2, m2, s3 = MIX
    shifted = torch.empty_like(x)
    for shift, multiplier in ((s1, m1), (s2, m2), (s3, None)):
        torch.bitwise_right_shift(x, shift, out=shifted)
        shifted &= (1 << (32 - shift)) - 1
        x ^= shifted
        if multiplier is not None:
            x *= _signed32(multiplier)
    return x


def _patterns(x: Tensor) -> Tensor:
    """int64 values in [0, 2³²) as the int32 tensor of the same bit patterns."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def mix32(x: Tensor) -> Tensor:
    """The 32-bit finaliser on an int64 tensor of values in [0, 2³²) (the same values back)."""
    return _mix_patterns_(_patterns(x)).to(torch.int64) & _M32


def name_salt(name: str) -> int:
    """A state vector's part of the key: the CRC-32 of its name (``"v"``, ``"H"``)."""
    return zlib.crc32(name.encode())


def rounding_key(steps: Tensor, salt: int, layer: int, name: str) -> Tensor:
    """The key of one layer's vector ``name`` at this write (a 0-d int64 tensor on ``steps``' device; no
    host synchronisation)."""
    k = mix32((steps.to(torch.int64) & _M32) ^ ((salt * GOLDEN) & _M32))
    k = mix32(k ^ (layer & _M32))
    return mix32(k ^ name_salt(name))


#: elements rounded at a time off CUDA: the passes of one piece stay in the CPU's cache (3× faster than whole
#: layers of millions of elements on a 2-core machine)
CPU_PIECE = 1 << 18


def random_bits(key: Tensor, n: int, start: int = 0) -> Tensor:
    """The 16 random bits of elements ``start, ..., start + n - 1`` under ``key``, as int32 values in
    [0, 65536): the finaliser in place over one int32 buffer and one temporary."""
    x = torch.arange(start, start + n, dtype=torch.int32, device=key.device)
    x ^= _patterns(key.to(torch.int64))
    _mix_patterns_(x)
    x &= 0xFFFF
    return x


def round_into(dst: Tensor, src: Tensor, key: Tensor) -> None:
    """Write ``src`` (float32 or float64) into the bfloat16 tensor ``dst`` of the same size, stochastically
    rounded with the bits of ``key`` (:func:`random_bits`); off CUDA in pieces of :data:`CPU_PIECE`."""
    flat, out = src.reshape(-1), dst.view(-1)
    n = flat.numel()
    piece = n if src.is_cuda else CPU_PIECE
    for start in range(0, n, piece):
        stop = min(n, start + piece)
        x = flat[start:stop].to(torch.float32)
        bits = random_bits(key, stop - start, start)
        bits += x.view(torch.int32)  # (no overflow but from a NaN's pattern, which is put back below)
        bits &= -65536
        out[start:stop].copy_(torch.where(x == x, bits.view(torch.float32), x))  # (exact: the low half is 0)


class RoundingKeys:
    """The keys of one layer's writes in one pass: its group's step counter, the pass's salt, its position."""

    def __init__(self, steps: Tensor, salt: int, layer: int) -> None:
        self.steps, self.salt, self.layer = steps, salt, layer

    def key(self, name: str) -> Tensor:
        """The key of the layer's vector ``name`` (``"v"``, not ``"state.v"``)."""
        return rounding_key(self.steps, self.salt, self.layer, name)
