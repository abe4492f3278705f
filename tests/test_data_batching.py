"""Token-budget batching: budget, determinism, mid-epoch resume, sharding over ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moetrain.data.batching import TokenBudgetBatcher, pack_sorted, padded_tokens


@pytest.fixture(scope="module")
def lengths():
    rng = np.random.default_rng(0)
    src = rng.integers(1, 60, size=1000)
    tgt = np.clip(src + rng.integers(-5, 6, size=1000), 1, None)
    return src, tgt


def _flat(batches):
    return np.concatenate([b for b in batches]) if batches else np.zeros(0, dtype=np.int64)


def test_budget_respected_and_every_pair_once(lengths):
    src, tgt = lengths
    batcher = TokenBudgetBatcher(src, tgt, max_tokens=400, seed=3)
    batches = batcher.epoch(0)
    for b in batches:
        assert len(b) >= 1 and padded_tokens(src[b], tgt[b]) <= 400
    assert sorted(_flat(batches).tolist()) == list(range(1000))
    # Bucketing keeps padding low, and batches use most of the budget.
    real = sum(int(src[b].sum() + tgt[b].sum()) for b in batches)
    assert real / sum(padded_tokens(src[b], tgt[b]) for b in batches) > 0.85
    assert real / (400 * len(batches)) > 0.7


def test_batches_mix_length_differences():
    """Pairs with the same longer side but different (src, tgt) share batches."""
    src = np.array([8, 7, 8, 6] * 50)
    tgt = np.array([8, 8, 7, 8] * 50)
    for b in TokenBudgetBatcher(src, tgt, max_tokens=320, seed=0).epoch(0):
        assert len({(int(s), int(t)) for s, t in zip(src[b], tgt[b])}) > 1


def test_oversized_pair_gets_its_own_batch():
    bounds = pack_sorted(np.array([2, 3, 50]), max_tokens=20)
    assert bounds.tolist() == [0, 2, 3]
    # Three pairs of longest side 3 cost 3 * 2 * 3 = 18 <= 20; a fourth would cost 24.
    assert pack_sorted(np.array([3, 3, 3, 3, 3]), max_tokens=20).tolist() == [0, 3, 5]


def test_deterministic_and_epochs_differ(lengths):
    src, tgt = lengths
    a = TokenBudgetBatcher(src, tgt, 400, seed=3)
    b = TokenBudgetBatcher(src, tgt, 400, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.epoch(0), b.epoch(0)))
    e0, e1 = a.epoch(0), a.epoch(1)
    assert len(e0) == len(e1)  # fixed number of batches per epoch
    assert any(not np.array_equal(x, y) for x, y in zip(e0, e1))
    other_seed = TokenBudgetBatcher(src, tgt, 400, seed=4).epoch(0)
    assert any(not np.array_equal(x, y) for x, y in zip(e0, other_seed))


def test_resume_mid_epoch_gives_the_same_remaining_batches(lengths):
    src, tgt = lengths
    batcher = TokenBudgetBatcher(src, tgt, 400, seed=7, dp_rank=1, dp_world=3)
    n = len(batcher)
    full = list(itertools.islice(batcher.iterate(0), 2 * n + 5))
    for start in (0, 5, n - 1, n, n + 3, 2 * n):
        resumed = list(itertools.islice(TokenBudgetBatcher(src, tgt, 400, seed=7, dp_rank=1, dp_world=3)
                                        .iterate(start), 2 * n + 5 - start))
        assert all(np.array_equal(x, y) for x, y in zip(full[start:], resumed))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_disjoint_cover_data_equal_counts(lengths, world):
    src, tgt = lengths
    shards = [TokenBudgetBatcher(src, tgt, 300, seed=1, dp_rank=r, dp_world=world).epoch(2) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal batch counts (empty batches pad)
    seen = np.concatenate([_flat(s) for s in shards])
    assert sorted(seen.tolist()) == list(range(1000))  # disjoint and covering
    empties = sum(len(b) == 0 for s in shards for b in s)
    assert empties < world


def test_unshuffled_order_is_sorted_and_shared(lengths):
    src, tgt = lengths
    batches = TokenBudgetBatcher(src, tgt, 400, shuffle=False).epoch(0)
    longest = [int(np.maximum(src[b], tgt[b]).max()) for b in batches]
    assert longest == sorted(longest)
    assert all(np.array_equal(x, y) for x, y in
               zip(batches, TokenBudgetBatcher(src, tgt, 400, shuffle=False, seed=9).epoch(5)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dp_rank"):
        TokenBudgetBatcher([1], [1], 10, dp_rank=2, dp_world=2)
    with pytest.raises(ValueError, match="lengths"):
        TokenBudgetBatcher([1, 2], [1], 10)
    assert list(TokenBudgetBatcher([], [], 10).iterate(0)) == []
