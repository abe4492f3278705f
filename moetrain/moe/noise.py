"""Counter-based routing noise.

Every random number the router uses (input jitter, Gumbel/exponential draws,
SparseMixer's order coin) is a pure function of
``(seed, step, layer, global token index, stream, column)``.

Why not ``torch.rand``: the global torch RNG advances differently on every
rank and is not saved in DeepSpeed checkpoints. With counter-based noise a token
gets the same draws whichever rank holds it, so expert parallelism 2 computes
exactly what one process computes, and a resumed run replays the same noise.

The hash is a few rounds of a 32-bit integer mixer evaluated in int64 torch
arithmetic (multipliers below 2**31 so no product overflows int64). It is not
cryptographic; it only has to look uniform and be reproducible everywhere.

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

    ``rounds=2`` is used for the last, per-column step, which runs on the full
    ``[T, C]`` grid and dominates the cost (input jitter has C = d_model).
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
    """
    device = token_ids.device
    tok = token_ids.to(torch.int64).reshape(-1, 1)
    # Hash the per-token prefix once ([T, 1]); only the last round runs on [T, C].
    h = torch.full((1, 1), seed & _MASK32, dtype=torch.int64, device=device)
    for value in (step, layer, stream):
        h = _mix32(h ^ _mix32(torch.full_like(h, (value & _MASK32) + 0x9E3779B9)))
    # Tokens may exceed 2**32 in very long runs: fold the high half in separately.
    h = _mix32(h ^ _mix32(tok & _MASK32))
    h = _mix32(h ^ _mix32((tok >> 32) + 0x3C6EF372))
    col = torch.arange(num_cols, dtype=torch.int64, device=device).reshape(1, -1)
    h = _mix32(h ^ _mix32(col + 0x2545F491), rounds=2)
    if dtype != torch.float64:
        # 24 bits are all a float32 can hold.
        return (((h >> 8).to(dtype) + 0.5) * (1.0 / 16777216.0)).to(dtype)
    # A second, chained word gives 53 bits for float64 users.
    h2 = _mix32(h + 0x6A09E667)
    hi = (h >> 5).to(torch.float64)  # 27 bits
    lo = (h2 >> 6).to(torch.float64)  # 26 bits
    u = (hi * 67108864.0 + lo + 0.5) / 9007199254740992.0  # (x + 0.5) / 2**53
    return u.to(dtype)


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
