"""Which blocks a step trains on, at any corpus size: a keyed permutation per epoch, and weighted mixtures.

`sample_order(n, seed, start, count)` gives positions start .. start+count-1 of an endless stream of
per-epoch shuffles of [0, n). Each epoch's shuffle is a Feistel network keyed by (seed, epoch) over the
smallest power-of-two domain >= n, with cycle walking (a value that lands outside [0, n) is mapped
again until it lands inside): a bijection of [0, n) computed position by position, so a step costs
O(batch) time and memory at any n (a full `randperm(n)` per step costs seconds and GBs at 10^7-10^8
blocks). The order depends only on (n, seed), so a run resumed at position p sees exactly what an
uninterrupted run would have, and every rank computes the same global batch.

`Mixture` interleaves sources by weight with stride scheduling: source s's j-th sample has virtual
time (j + 0.5) / w_s and samples are taken in order of virtual time, so after p samples source s has
w_s * p of them to within one. Its state is the per-source sample counts, saved with the run.
"""

from __future__ import annotations

import math

import numpy as np

FEISTEL_ROUNDS = 4
"""Four rounds make a Feistel network a pseudo-random permutation (Luby-Rackoff); plenty for a data order."""


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit mix (multiply-xorshift, as in splitmix64); uint64 arithmetic wraps around."""
    values = (values ^ key) * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(31))
    return values * np.uint64(0x94D049BB133111EB)


class EpochPermutation:
    """A seeded bijection of [0, n), evaluated for any array of positions.

    The domain is [0, 2^bits) with 2^bits >= n > 2^(bits-1), split into a high and a low half; each round
    XORs one half with a keyed hash of the other (invertible whatever the halves' widths), and cycle
    walking maps values >= n again until they land in [0, n). The domain is under 2n, so a value needs
    fewer than two walks on average.
    """

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"cannot shuffle {n} samples")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        low_bits = bits // 2
        self.shift = np.uint64(low_bits)
        self.low_mask = np.uint64((1 << low_bits) - 1)
        self.high_mask = np.uint64((1 << (bits - low_bits)) - 1)
        self.keys = np.random.SeedSequence([seed & (2**63 - 1), epoch]).generate_state(FEISTEL_ROUNDS, dtype=np.uint64)

    def _rounds(self, values: np.ndarray) -> np.ndarray:
        high, low = values >> self.shift, values & self.low_mask
        for round_index, key in enumerate(self.keys):
            if round_index % 2 == 0:
                high = high ^ ((_mix(low, key) >> np.uint64(32)) & self.high_mask)
            else:
                low = low ^ ((_mix(high, key) >> np.uint64(32)) & self.low_mask)
        return (high << self.shift) | low

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            values = self._rounds(np.asarray(positions, dtype=np.uint64))
            outside = np.flatnonzero(values >= self.n)
            while outside.size:  # cycle walking
                walked = self._rounds(values[outside])
                values[outside] = walked
                outside = outside[walked >= self.n]
        return values.astype(np.int64)


def sample_order(num_samples: int, seed: int, start: int, count: int) -> np.ndarray:
    """Samples `start .. start+count-1` of the stream of per-epoch shuffles of [0, num_samples)."""
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_samples)
    order = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):  # one or two epochs per step unless the corpus is smaller than a batch
        selected = epochs == epoch
        order[selected] = EpochPermutation(num_samples, seed, int(epoch))(offsets[selected])
    return order


class Mixture:
    """Weighted interleaving of sources of `sizes[s]` blocks; each source is shuffled by its own stream."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        check_weights(weights)
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        total = float(sum(weights))
        self.sizes = list(sizes)
        self.weights = [w / total for w in weights]
        # Source 0 keeps the run's seed: a one-source run shuffles exactly as `sample_order(n, seed, ...)`.
        self.seeds = [seed + 1_000_003 * index for index in range(len(sizes))]

    def next_sources(self, counts: list[int], count: int) -> np.ndarray:
        """Which source each of the next `count` samples comes from, given the samples each has had."""
        if len(self.sizes) == 1:
            return np.zeros(count, dtype=np.int64)
        sources, times = [], []
        for source, (weight, done) in enumerate(zip(self.weights, counts)):
            if weight > 0:
                ordinals = np.arange(done, done + count, dtype=np.float64)
                times.append((ordinals + 0.5) / weight)
                sources.append(np.full(count, source, dtype=np.int64))
        times, sources = np.concatenate(times), np.concatenate(sources)
        chosen = np.lexsort((sources, times))[:count]  # by virtual time, ties by source index
        return sources[chosen]

    def draw(self, counts: list[int], count: int) -> tuple[list[tuple[int, int]], list[int]]:
        """The next `count` samples as (source, block) pairs, and the counts after them."""
        sources = self.next_sources(counts, count)
        blocks = np.empty(count, dtype=np.int64)
        after = list(counts)
        for source in np.unique(sources):
            selected = sources == source
            taken = int(selected.sum())
            blocks[selected] = sample_order(self.sizes[source], self.seeds[source], counts[source], taken)
            after[source] += taken
        return list(zip(sources.tolist(), blocks.tolist())), after


def check_weights(weights: list[float]) -> None:
    for weight in weights:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"mixture weight {weight!r}: weights must be finite numbers >= 0")
    if not weights or sum(weights) <= 0:
        raise ValueError(f"mixture weights {list(weights)} are all zero: give at least one source a weight > 0")
