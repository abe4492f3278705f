"""Counter-based routing noise: a pure function of (seed, step, layer, stream, token id, column)."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.moe.noise import (
    STREAM_COIN,
    STREAM_COIN_2,
    STREAM_JITTER,
    STREAM_SAMPLE,
    STREAM_SAMPLE_2,
    FixedNoise,
    RoutingNoise,
    counter_uniform,
)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which made
    small matmuls 10-50x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_streams_are_distinct():
    streams = [STREAM_JITTER, STREAM_SAMPLE, STREAM_COIN, STREAM_SAMPLE_2, STREAM_COIN_2]
    assert len(set(streams)) == len(streams)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_range_and_determinism(dtype):
    ids = torch.arange(1000)
    u = counter_uniform(1, 2, 3, STREAM_SAMPLE, ids, 7, dtype)
    assert u.shape == (1000, 7) and u.dtype == dtype
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(u, counter_uniform(1, 2, 3, STREAM_SAMPLE, ids, 7, dtype))


@pytest.mark.parametrize("field", range(5))
def test_every_key_changes_the_draws(field):
    key = [5, 6, 7, STREAM_SAMPLE]
    ids = torch.arange(64)
    base = counter_uniform(*key, ids, 4)
    if field < 4:
        key[field] += 1
        other = counter_uniform(*key, ids, 4)
    else:
        other = counter_uniform(*key, ids + 64, 4)
    # Independent draws: essentially no coordinate coincides.
    assert (base == other).float().mean() < 0.01


def test_rows_depend_only_on_the_token_id():
    """Same token id -> same draws, whatever else is in the batch and wherever it sits
    (this is what makes expert parallelism reproduce the single-process run)."""
    ids = torch.tensor([17, 3, 99, 3, 2**40 + 5])
    u = counter_uniform(0, 1, 2, STREAM_COIN, ids, 5)
    assert torch.equal(u[1], u[3])
    alone = torch.cat([counter_uniform(0, 1, 2, STREAM_COIN, ids[i : i + 1], 5) for i in range(5)])
    assert torch.equal(u, alone)
    # Columns are a prefix: asking for more columns does not change the first ones.
    assert torch.equal(counter_uniform(0, 1, 2, STREAM_COIN, ids, 9)[:, :5], u)
    # Ids beyond 2**32 are not folded onto small ones.
    assert not torch.equal(counter_uniform(0, 0, 0, 1, torch.tensor([5]), 8), counter_uniform(0, 0, 0, 1, torch.tensor([2**32 + 5]), 8))


def test_routing_noise_matches_counter_uniform_and_transforms():
    ids = torch.arange(5000)
    rn = RoutingNoise(seed=3, step=9, layer=1, token_ids=ids, dtype=torch.float64)
    u = counter_uniform(3, 9, 1, STREAM_SAMPLE, ids, 6, torch.float64)
    assert torch.equal(rn.uniform(STREAM_SAMPLE, 6), u)
    assert torch.equal(rn.exponential(STREAM_SAMPLE, 6), -torch.log(u))
    assert torch.equal(rn.gumbel(STREAM_SAMPLE, 6), -torch.log(-torch.log(u)))
    assert abs(rn.exponential(STREAM_SAMPLE, 6).mean().item() - 1.0) < 0.03
    assert abs(rn.gumbel(STREAM_SAMPLE, 6).mean().item() - 0.5772156649) < 0.04


def test_uniformity_and_independence():
    u = counter_uniform(11, 0, 0, STREAM_SAMPLE, torch.arange(50_000), 4, torch.float64)
    n = u.numel()
    hist = torch.histc(u, bins=20, min=0, max=1)
    expected = n / 20
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # chi-square, 19 df, p = 0.001
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    corr = torch.corrcoef(u.t())
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 0.02  # columns
    v = counter_uniform(11, 0, 0, STREAM_COIN, torch.arange(50_000), 1, torch.float64)
    assert abs(torch.corrcoef(torch.stack([u[:, 0], v[:, 0]]))[0, 1]) < 0.02  # streams
    w = counter_uniform(11, 0, 0, STREAM_SAMPLE, torch.arange(1, 50_001), 1, torch.float64)
    assert abs(torch.corrcoef(torch.stack([u[:, 0], w[:, 0]]))[0, 1]) < 0.02  # neighbouring tokens


def test_float64_has_more_than_24_bits():
    u = counter_uniform(0, 0, 0, STREAM_SAMPLE, torch.arange(1000), 4, torch.float64)
    assert ((u * 2**25) != torch.round(u * 2**25)).float().mean() > 0.99
    u32 = counter_uniform(0, 0, 0, STREAM_SAMPLE, torch.arange(1000), 4, torch.float32).double()
    assert torch.equal(u32 * 2**25, torch.round(u32 * 2**25))


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 24), (torch.float64, 53)])
def test_draws_are_odd_multiples_so_never_zero_or_one(dtype, bits):
    """float32 draws are odd multiples of 2**-24 and float64 draws odd multiples of 2**-53, so the
    extremes are 2**-bits and 1 - 2**-bits, never 0 or 1. (Regression: the original
    (x + 0.5) / 2**24 with a 24-bit x needed a 25th bit and rounded the largest x to exactly 1.0,
    one draw in 2**24; -log U was then 0, the Gumbel draw +inf, which selected that expert even
    when masked and produced NaN in STGS. Same in float64 with 53 bits.)"""
    u = counter_uniform(4, 1, 0, STREAM_SAMPLE, torch.arange(50_000), 8, dtype).double()
    scaled = u * 2.0**bits
    assert torch.equal(scaled, torch.round(scaled))
    assert (torch.remainder(scaled, 2) == 1).all()
    assert ((u > 0) & (u < 1)).all()
    top = 1 - 2.0**-bits
    assert top < 1.0 and torch.tensor(top, dtype=dtype).item() == top  # the largest draw is representable


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_dtypes_are_rounded_float32_draws(dtype):
    """Rounding float32 draws to bfloat16 / float16 reaches 1.0 about once in 2**9 / 2**11 draws
    (and float16's 2**-25 would round to 0): the result must still lie in (0, 1)."""
    ids = torch.arange(20_000)
    u = counter_uniform(2, 0, 0, STREAM_JITTER, ids, 4, dtype)
    ref = counter_uniform(2, 0, 0, STREAM_JITTER, ids, 4, torch.float32)
    assert ((u > 0) & (u < 1)).all()
    assert (u.float() - ref).abs().max() <= 2 * torch.finfo(dtype).eps
    assert abs(u.float().mean().item() - 0.5) < 0.01


def test_fixed_noise():
    draws = torch.tensor([[0.2, 0.7], [0.4, 0.9]], dtype=torch.float64)
    fn = FixedNoise({STREAM_SAMPLE: draws, STREAM_COIN: torch.tensor([0.1, 0.6])})
    assert torch.equal(fn.uniform(STREAM_SAMPLE, 2), draws)
    assert fn.uniform(STREAM_COIN, 1).shape == (2, 1)
    assert torch.equal(fn.exponential(STREAM_SAMPLE, 2), -torch.log(draws))
    assert torch.equal(fn.gumbel(STREAM_SAMPLE, 2), -torch.log(-torch.log(draws)))
    with pytest.raises(ValueError, match="columns"):
        fn.uniform(STREAM_SAMPLE, 3)
    with pytest.raises(KeyError):
        fn.uniform(STREAM_JITTER, 2)


def test_empty_token_batch():
    u = counter_uniform(0, 0, 0, STREAM_SAMPLE, torch.zeros(0, dtype=torch.long), 5)
    assert u.shape == (0, 5)
