"""Token-budget batching with length bucketing: deterministic, resumable, sharded over ranks.

A batch holds as many sentence pairs as fit ``max_tokens`` padded tokens; pairs of similar
length go together so little of the budget is padding. A pair's size is its longer side
``L = max(src, tgt)`` and a batch costs ``rows * 2 * max L``, an upper bound on its padded
source + target tokens (``rows * (max src + max tgt)``). The plan:

1. Once: sort pairs by ``L`` and cut the sorted list greedily into batches. Pairs with the
   same ``L`` cost the same, so they are interchangeable and the cut points depend on the
   lengths only.
2. Every epoch: re-draw the order *within* each group of equal ``L`` (batches hold
   different pairs each epoch while the cut points, hence the number of batches, stay
   fixed), then shuffle the batches. Both draws are a pure function of ``(seed, epoch)``.

Keying on ``L`` alone, not on both lengths, also mixes pairs whose sides differ in length
within a batch. Where the length difference carries information (a sentence type that
always adds a word), exact ``(src, tgt)`` buckets would give batches of one kind only.
3. Rank ``r`` of ``W`` takes batches ``r, r + W, r + 2W, ...`` of the shuffled list, which
   is first padded with empty batches to a multiple of ``W``: every rank gets the same
   number of batches per epoch, and the ranks' shards are disjoint and cover the data.

Because the count per epoch is fixed, resuming after ``n`` micro-batches is arithmetic:
epoch ``n // per_rank``, position ``n % per_rank``; no batch is replayed or skipped.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["TokenBudgetBatcher", "pack_sorted", "padded_tokens"]


def padded_tokens(src_len: np.ndarray, tgt_len: np.ndarray) -> int:
    """Tokens a batch occupies once padded: ``rows * (max src + max tgt)``."""
    if len(src_len) == 0:
        return 0
    return int(len(src_len) * (int(np.max(src_len)) + int(np.max(tgt_len))))


def pack_sorted(longest: np.ndarray, max_tokens: int) -> np.ndarray:
    """Greedy cut points over pairs sorted by ascending longer side ``longest``.

    A batch of ``rows`` pairs costs ``rows * 2 * (its last, largest, longest)``. Returns
    ``bounds`` such that batch ``i`` is ``[bounds[i], bounds[i + 1])``. A pair over the
    budget on its own still gets a batch (of one).
    """
    # With ``longest`` ascending, the cost of [start, end) grows with ``end``: binary-search
    # the largest end that fits (one Python step per batch, not per pair).
    longest = np.asarray(longest, dtype=np.int64)
    n = len(longest)
    bounds = [0]
    start = 0
    while start < n:
        lo, hi = start + 1, n  # lo always fits (a batch holds at least one pair)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - start) * 2 * int(longest[mid - 1]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        bounds.append(lo)
        start = lo
    return np.asarray(bounds, dtype=np.int64)


class TokenBudgetBatcher:
    """Batches of sample indices for one data-parallel rank.

    Args:
        src_len / tgt_len: ``[N]`` token counts of each pair (EOS included).
        max_tokens: padded-token budget of one batch (per rank, per micro-batch).
        seed: with the epoch, decides the order (``numpy`` PCG64 seeded by ``[seed, epoch]``).
        dp_rank / dp_world: this rank and the number of data-parallel ranks.
        shuffle: False keeps the sorted order (evaluation): batches go to ranks round-robin
            and no randomness is used.

    ``per_rank`` batches per epoch on every rank, some possibly empty (``size 0``).
    """

    def __init__(self, src_len, tgt_len, max_tokens: int, seed: int = 0, dp_rank: int = 0, dp_world: int = 1,
                 shuffle: bool = True):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, {dp_world}), got {dp_rank}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.src_len = np.asarray(src_len, dtype=np.int64)
        self.tgt_len = np.asarray(tgt_len, dtype=np.int64)
        if self.src_len.shape != self.tgt_len.shape:
            raise ValueError(f"{self.src_len.size} source lengths for {self.tgt_len.size} target lengths")
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._longest = np.maximum(self.src_len, self.tgt_len)
        order = self._sorted_order(None)
        self.bounds = pack_sorted(self._longest[order], max_tokens)
        self.num_batches = len(self.bounds) - 1
        self.per_rank = -(-self.num_batches // dp_world)  # ceil
        self._unshuffled = order

    def __len__(self) -> int:
        """Batches per epoch on this rank (empty ones included)."""
        return self.per_rank

    def _sorted_order(self, rng: np.random.Generator | None) -> np.ndarray:
        """Indices sorted by the longer side; ties in random order when ``rng`` is given."""
        n = self.src_len.size
        tie = rng.random(n) if rng is not None else np.arange(n)
        return np.lexsort((tie, self._longest))  # the last key sorts first

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of one epoch, in order (index arrays, possibly empty)."""
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = self._sorted_order(rng)
            batch_order = rng.permutation(self.num_batches)
        else:
            order, batch_order = self._unshuffled, np.arange(self.num_batches)
        empty = np.zeros(0, dtype=np.int64)
        mine = []
        for slot in range(self.dp_rank, self.per_rank * self.dp_world, self.dp_world):
            if slot < self.num_batches:
                b = batch_order[slot]
                mine.append(order[self.bounds[b]:self.bounds[b + 1]])
            else:
                mine.append(empty)
        return mine

    def iterate(self, start_step: int = 0, epochs: int | None = None) -> Iterator[np.ndarray]:
        """Batches from micro-batch ``start_step`` on (counted on this rank), epoch after epoch.

        Args:
            start_step: micro-batches this rank already consumed (resume point).
            epochs: stop after this many epochs in total (None = endless).
        """
        if self.per_rank == 0:
            return
        epoch, offset = divmod(start_step, self.per_rank)
        while epochs is None or epoch < epochs:
            yield from self.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0
