"""The training data order without materialised permutations: a keyed Feistel permutation.

Each epoch visits every tile once in the order of a pseudo-random permutation of ``[0, N)``.
Instead of shuffling an ``N``-long array (1.5 GB and seconds per epoch at 190 M tiles), the
permutation is computed per position: a balanced Feistel network on the smallest even power
of two ``>= N``, with *cycle walking* (re-encrypt until the value lands below ``N``) to
restrict it to ``[0, N)`` (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002).
A Feistel network is a bijection for any round function, and cycle walking keeps it one, so
every epoch is a true permutation; memory and time per position are O(1) in ``N``.

The order is a function of (seed, micro-step, rank) alone: micro-step ``s`` on rank ``r`` of
``W`` takes the global positions ``(s * W + r) * B + i`` (``i < B``), position ``p`` lies in
epoch ``p // N`` at ``p % N`` of that epoch's permutation. Resuming at any step, or with
another number of loader workers, replays the same tiles.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = [
    "FeistelPermutation",
    "MicroStepSampler",
    "epoch_permutation",
    "replacement_index",
    "sample_indices",
]

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser constants (Steele et al. 2014)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of ``x + key`` (a random round key): the round function (uint64)."""
    z = x + key  # array arithmetic in uint64 wraps modulo 2**64, as the hash needs
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """A keyed pseudo-random permutation of ``[0, n)``, evaluated per index.

    Parameters
    ----------
    n : int
        Domain size (>= 1); any size up to 2**62.
    key : sequence of int
        Key material (e.g. ``(seed, epoch)``); equal keys give equal permutations.

    Examples
    --------
    >>> p = FeistelPermutation(10, (0, 1))
    >>> sorted(p(np.arange(10)).tolist()) == list(range(10))
    True
    """

    def __init__(self, n: int, key: Sequence[int]) -> None:
        if n < 1:
            raise ValueError(f"permutation size must be >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2  # balanced halves
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        seq = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key] + [len(key)])
        self._keys = seq.generate_state(_ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix(right, k) & self._mask)
        return (left << self._half) | right

    def __call__(self, index: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Images of ``index`` (any shape of ints in ``[0, n)``) as int64 of the same shape."""
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise ValueError(f"permutation indices must lie in [0, {self.n})")
        out = self._encrypt(idx.astype(np.uint64).ravel())
        n = np.uint64(self.n)
        outside = out >= n
        while outside.any():  # cycle walking: < 4 rounds expected (domain < 4 n)
            out[outside] = self._encrypt(out[outside])
            outside = out >= n
        return out.astype(np.int64).reshape(idx.shape)


@functools.lru_cache(maxsize=8)
def epoch_permutation(n: int, *, seed: int, epoch: int) -> FeistelPermutation:
    """The permutation of tiles used in ``epoch`` of a run seeded with ``seed`` (cached)."""
    return FeistelPermutation(n, (seed, 7919, epoch))


def sample_indices(
    n: int, *, seed: int, step: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """Dataset indices for micro-step ``step`` on ``rank``: positions in a per-epoch permutation.

    Parameters
    ----------
    n : int
        Number of tiles (>= 1).
    seed, step, batch_size, rank, world_size : int
        The run's seed, the micro-step, the per-rank batch size and the rank layout.

    Returns
    -------
    ndarray
        (batch_size,) int64 in ``[0, n)``; the global sample positions are
        ``(step * world_size + rank) * batch_size + i``. Within an epoch no tile repeats,
        across ranks included.
    """
    start = (step * world_size + rank) * batch_size
    pos = np.arange(start, start + batch_size, dtype=np.int64)
    out = np.empty(batch_size, dtype=np.int64)
    epochs = pos // n
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(n, seed=seed, epoch=int(epoch))(pos[sel] % n)
    return out


def replacement_index(n: int, *, seed: int, position: int, attempt: int) -> int:
    """The tile tried instead of an unreadable one at global sample ``position``.

    A deterministic draw of its own (an independent permutation per attempt and epoch),
    so a run that meets the same unreadable tiles replays the same replacements.
    """
    perm = FeistelPermutation(n, (seed, 104723, attempt, position // n))
    return int(perm(position % n))


class MicroStepSampler:
    """A ``torch.utils.data`` sampler of micro-step numbers ``start, start + 1, ...`` (endless).

    The loader's dataset turns micro-step ``s`` into the whole micro-batch (the tiles of
    :func:`sample_indices`, their crops and masks), so the order does not depend on how many
    worker processes build them.
    """

    def __init__(self, start: int = 0) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)
