"""Counter-based routing noise.

Every random number the router uses (input jitter, Gumbel/exponential draws,
SparseMixer's order coin) is a pure function of
``(seed, step, layer, global token index, stream, column)``.

Why not ``torch.rand``: the global torch RNG advances differently on every
rank and is not saved in DeepSpeed checkpoints. With counter-based noise a token
gets the same draws whichever rank holds it, so expert parallelism 2 computes
exactly what one process computes, and a resumed run replays the same noise.

The hash is a few rounds of a 32-bit integer mixer (multiply, xor-shift). It is
not cryptographic; it only has to look uniform and be reproducible everywhere.
Everything that does not depend on the column (seed, step, layer, stream, token)
is hashed once per token into a row key, each column once into a column key
(int64 arithmetic, multipliers below 2**31 so no product overflows); the
``[T, C]`` grid then only runs two multiply-xorshift rounds on ``row ^ column``,
in int32 (see :func:`_fill_uniform`).

Shapes: T tokens, C columns (experts, or channels for input jitter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# Odd multipliers < 2**31 so that (x < 2**32) * m < 2**63 never overflows int64.
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D
_M3 = 0x297A2D39

# Streams: independent families of draws for one (step, layer, token).
STREAM_JITTER = 1
STREAM_SAMPLE = 2  # Gumbel / exponential draws for the first sampled slot
STREAM_COIN = 3  # SparseMixer's first-order vs mid-point coin
STREAM_SAMPLE_2 = 4  # second slot of SparseMixer-v2
STREAM_COIN_2 = 5


def _mix32(x: Tensor, rounds: int = 3) -> Tensor:
    """Avalanche mixing of values held in int64; result in [0, 2**32).

    Used for the per-token and per-column keys (small tensors); the ``[T, C]``
    grid has its own two-round int32 version, :func:`_fill_uniform`.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    if rounds > 2:
        x = (x * _M3) & _MASK32
        x = x ^ (x >> 15)
    return x


# On the CPU the [T, C] grid is hashed in blocks of this many elements per intra-op
# thread (256 KiB of int32 per thread and temporary). A block's temporaries stay in
# cache (L2) and are recycled by the allocator, where whole-grid ops would stream
# each temporary through memory and often page in fresh memory for it. Input jitter
# at T=4096, C=512 took ~45 ms as whole-grid int64 ops; in blocks it takes ~5 ms on
# one core and ~5-7 ms on two (blocks of one grain per thread: ~12-18 ms). GPUs get
# the whole grid in one go.
_CPU_BLOCK_ELEMENTS_PER_THREAD = 2**16
_INT32_MAX = 2**31 - 1


def counter_uniform(
    seed: int,
    step: int,
    layer: int,
    stream: int,
    token_ids: Tensor,
    num_cols: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform draws in the open interval (0, 1), shape ``[T, num_cols]``.

    ``token_ids`` are *global* token indices (int64, shape ``[T]``); the same id
    always gets the same row of draws for a given (seed, step, layer, stream).
    float32 draws are odd multiples of 2**-24 (23 random bits), float64 draws odd
    multiples of 2**-53 (52 bits); narrower dtypes are rounded float32 draws.
    """
    device = token_ids.device
    tok = token_ids.to(torch.int64).reshape(-1, 1)
    # Row keys [T, 1]: everything but the column, hashed once per token.
    h = torch.full((1, 1), seed & _MASK32, dtype=torch.int64, device=device)
    for value in (step, layer, stream):
        h = _mix32(h ^ _mix32(torch.full_like(h, (value & _MASK32) + 0x9E3779B9)))
    # Tokens may exceed 2**32 in very long runs: fold the high half in separately.
    h = _mix32(h ^ _mix32(tok & _MASK32))
    row_key = _as_int32(_mix32(h ^ _mix32((tok >> 32) + 0x3C6EF372)))
    col_key = _as_int32(_mix32(torch.arange(num_cols, dtype=torch.int64, device=device).reshape(1, -1) + 0x2545F491))

    wide = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(tok.shape[0], num_cols, dtype=wide, device=device)
    rows = tok.shape[0]
    if device.type == "cpu":
        rows = max(1, _CPU_BLOCK_ELEMENTS_PER_THREAD * torch.get_num_threads() // max(num_cols, 1))
    for start in range(0, tok.shape[0], rows):
        _fill_uniform(row_key[start : start + rows], col_key, out[start : start + rows])
    if dtype in (torch.float32, torch.float64):
        return out
    # Narrower dtypes are rounded from float32 (the hash words overflow float16 and
    # collapse to a few values in bfloat16); rounding can reach 0 or 1, so clamp:
    # U = 1 makes Exp = -log U zero and the Gumbel +inf, which would pick that expert
    # whatever its logit (even a masked one) and give NaNs in STGS.
    finfo = torch.finfo(dtype)
    return out.to(dtype).clamp(min=finfo.tiny, max=1.0 - finfo.eps / 2)


def _as_int32(words: Tensor) -> Tensor:
    """32-bit words held in int64 ``[0, 2**32)`` -> the same bits as int32 (two's complement)."""
    return (words - ((words > _INT32_MAX).to(torch.int64) << 32)).to(torch.int32)


def _fill_uniform(row_key: Tensor, col_key: Tensor, out: Tensor) -> None:
    """Write the draws of the grid ``row_key [t, 1] x col_key [1, C]`` (int32) into ``out [t, C]``.

    Two multiply-xorshift rounds of a 32-bit mixer (as in :func:`_mix32`) on
    ``row ^ col``, in place on one int32 buffer. The keys are already well mixed,
    so the grid needs no more rounds than this; the high bits of the final word,
    which depend on every input bit, become the draw.

    int32, not int64: half the memory traffic, and AVX2 has a 32-bit but no 64-bit
    vector multiply (int64 took twice as long here). torch's int32 multiplication
    wraps modulo 2**32 (two's complement, as the hardware does on CPU and GPU), so
    the words equal exact 32-bit arithmetic: the int64 computation
    ``(w * m) & 0xFFFFFFFF`` gives the same bits. Right shifts of int32 copy the
    sign bit, so each shift is masked to act as the logical shift of a uint32.
    """
    w = torch.bitwise_xor(row_key, col_key)
    w.mul_(_M1)
    w.bitwise_xor_((w >> 15).bitwise_and_(0x1FFFF))
    w.mul_(_M2)
    w.bitwise_xor_((w >> 16).bitwise_and_(0xFFFF))
    if out.dtype == torch.float64:
        # Two 26-bit halves of a chained pair of words (int64: rarely used, cost is no issue).
        w1 = w.to(torch.int64) & _MASK32
        w2 = ((w1 ^ 0x6A09E667) * _M3) & _MASK32
        w2 ^= w2 >> 15
        x = ((w1 >> 6) << 26) | (w2 >> 6)
        # x (52 bits) -> 2x + 1 (53 bits, exact in float64) -> (x + 0.5) / 2**52.
        out.copy_((x << 1) | 1).mul_(2.0**-53)
        return
    # The top 23 bits x as the mantissa of a float in [1, 2): 1 + x / 2**23. Minus
    # (1 - 2**-24), exactly (Sterbenz), that is (x + 0.5) / 2**23 in [2**-24, 1 - 2**-24]:
    # never 0 or 1. (Computing x + 0.5 from a 24-bit x would need a 25th bit, and the
    # largest x would round to exactly 1.0.) Converting int -> float is slower than this.
    w.bitwise_right_shift_(9).bitwise_and_(0x7FFFFF).bitwise_or_(0x3F800000)
    torch.sub(w.view(torch.float32), 1.0 - 2.0**-24, out=out)


@dataclass
class RoutingNoise:
    """The noise source an estimator draws from for one layer call.

    ``uniform(stream, num_cols)`` returns ``[T, num_cols]`` draws in (0, 1).
    Tests subclass this (see :class:`FixedNoise`) to inject known draws.
    """

    seed: int
    step: int
    layer: int
    token_ids: Tensor
    dtype: torch.dtype = torch.float32

    def uniform(self, stream: int, num_cols: int) -> Tensor:
        return counter_uniform(self.seed, self.step, self.layer, stream, self.token_ids, num_cols, self.dtype)

    def exponential(self, stream: int, num_cols: int) -> Tensor:
        """Exp(1) draws: ``-log U``."""
        return -torch.log(self.uniform(stream, num_cols))

    def gumbel(self, stream: int, num_cols: int) -> Tensor:
        """Gumbel(0, 1) draws: ``-log(-log U)``."""
        return -torch.log(self.exponential(stream, num_cols))


class FixedNoise(RoutingNoise):
    """Noise with given uniform draws per stream, for tests and oracles.

    ``draws`` maps a stream id to a ``[T, C]`` tensor of uniforms in (0, 1).
    """

    def __init__(self, draws: dict[int, Tensor]):
        self.draws = draws

    def uniform(self, stream: int, num_cols: int) -> Tensor:
        u = self.draws[stream]
        if u.dim() == 1:
            u = u.unsqueeze(-1)
        if u.shape[-1] != num_cols:
            raise ValueError(f"FixedNoise stream {stream}: expected {num_cols} columns, got {tuple(u.shape)}")
        return u
