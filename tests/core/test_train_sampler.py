"""The data order: a keyed Feistel permutation per epoch, computed per position (no array of N)."""

from __future__ import annotations

import numpy as np
import pytest

from gpfm_core.train.sampler import (
    FeistelPermutation,
    MicroStepSampler,
    replacement_index,
    sample_indices,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 65537])
def test_every_size_is_a_true_permutation(n: int) -> None:
    values = FeistelPermutation(n, (0, 1))(np.arange(n))
    assert values.dtype == np.int64
    assert np.array_equal(np.sort(values), np.arange(n))


def test_the_key_decides_the_permutation() -> None:
    n = 1000
    a = FeistelPermutation(n, (0, 1))(np.arange(n))
    assert np.array_equal(a, FeistelPermutation(n, (0, 1))(np.arange(n)))
    for key in [(0, 2), (1, 1)]:
        assert (a != FeistelPermutation(n, key)(np.arange(n))).mean() > 0.99


def test_the_order_looks_random() -> None:
    n = 20_000
    v = FeistelPermutation(n, (3, 4))(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), v)[0, 1]) < 0.03
    assert (v == np.arange(n)).sum() <= 10  # a random permutation has ~1 fixed point
    # consecutive positions land far apart (not a stride through the tiles)
    assert np.median(np.abs(np.diff(v))) > n / 10


def test_a_huge_domain_needs_no_array_of_its_size() -> None:
    # 10**12 tiles: a materialised permutation would need 8 TB
    n = 10**12
    perm = FeistelPermutation(n, (0, 0))
    pos = np.array([0, 1, 2, n - 1, 123_456_789_012])
    v = perm(pos)
    assert ((v >= 0) & (v < n)).all() and len(set(v.tolist())) == len(pos)
    idx = sample_indices(n, seed=0, step=10**9, batch_size=96, rank=3, world_size=16)
    assert idx.shape == (96,) and ((idx >= 0) & (idx < n)).all()
    assert len(set(idx.tolist())) == 96


@pytest.mark.parametrize(("n", "batch", "world"), [(48, 4, 2), (50, 4, 2), (97, 8, 3), (10, 32, 1)])
def test_an_epoch_visits_every_tile_once_across_ranks(n: int, batch: int, world: int) -> None:
    steps = -(-3 * n // (batch * world))  # three epochs or more
    pos = []
    for step in range(steps):
        for rank in range(world):
            pos.append(
                sample_indices(n, seed=5, step=step, batch_size=batch, rank=rank, world_size=world)
            )
    order = np.concatenate(pos)  # global position order
    for epoch in range(3):
        chunk = order[epoch * n : (epoch + 1) * n]
        assert np.array_equal(np.sort(chunk), np.arange(n)), epoch
    # each epoch its own order
    assert not np.array_equal(order[:n], order[n : 2 * n])


def test_the_order_is_a_function_of_seed_step_and_rank() -> None:
    kw = {"batch_size": 8, "world_size": 2}
    a = sample_indices(1000, seed=1, step=37, rank=1, **kw)
    assert np.array_equal(a, sample_indices(1000, seed=1, step=37, rank=1, **kw))
    assert not np.array_equal(a, sample_indices(1000, seed=2, step=37, rank=1, **kw))
    assert not np.array_equal(a, sample_indices(1000, seed=1, step=37, rank=0, **kw))
    assert set(a.tolist()).isdisjoint(sample_indices(1000, seed=1, step=37, rank=0, **kw))


def test_replacements_are_deterministic_and_in_range() -> None:
    got = [replacement_index(50, seed=0, position=p, attempt=a) for p in range(20) for a in (0, 1)]
    again = [
        replacement_index(50, seed=0, position=p, attempt=a) for p in range(20) for a in (0, 1)
    ]
    assert got == again and all(0 <= v < 50 for v in got)
    assert len(set(got)) > 15  # spread over the tiles, not one fallback tile


def test_micro_step_sampler_starts_where_asked() -> None:
    it = iter(MicroStepSampler(7))
    assert [next(it) for _ in range(3)] == [7, 8, 9]
