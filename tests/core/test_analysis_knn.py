"""Neighbour graphs for UMAP: exact brute force and the inverted-file search (real torch)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from gpfm_core.analysis.knn import exact_knn, ivf_knn
from gpfm_core.errors import GpfmError


def _manifold(n: int, seed: int = 0) -> np.ndarray:
    """A 4-d latent bent into 32-d with a little noise: the low intrinsic dimension of tiles."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (n, 4))
    w = rng.normal(size=(4, 32))
    return (np.tanh(z @ w) + 0.05 * rng.standard_normal((n, 32))).astype(np.float32)


def _recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(s)) / a.shape[1] for r, s in zip(a, b, strict=True)]))


def test_exact_knn_matches_sklearn_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(scale=4.0, size=(5, 20))[np.arange(3000) % 5] + rng.normal(size=(3000, 20))
    x = np.vstack([x, x[:5]]).astype(np.float32)  # exact duplicates: self must still come first
    idx, dist = exact_knn(x, 12, block=512)
    ref_d, ref_i = NearestNeighbors(n_neighbors=12).fit(x).kneighbors(x)
    assert idx.shape == (3005, 12) and idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx[:, 0], np.arange(3005)) and np.all(dist[:, 0] == 0)
    assert np.allclose(dist, ref_d, atol=1e-4)
    # duplicates make exact ties, whose order may differ: compare neighbour sets + distances
    true = np.linalg.norm(x[idx] - x[:, None, :], axis=2)
    assert np.allclose(true, dist, atol=1e-4)
    assert _recall(idx[:, :-1], ref_i[:, :-1]) > 10.9 / 11
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_ivf_knn_recall_and_exact_distances() -> None:
    x = _manifold(6000)
    ref_i, ref_d = exact_knn(x, 15)
    idx, dist = ivf_knn(x, 15, n_lists=80, n_probe=8)
    assert idx.shape == (6000, 15) and idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx[:, 0], np.arange(6000)) and np.all(dist[:, 0] == 0)
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert all(len(set(r)) == 15 for r in idx)  # each neighbour once
    assert np.allclose(np.linalg.norm(x[idx] - x[:, None, :], axis=2), dist, atol=1e-4)
    assert _recall(idx, ref_i) > 0.9
    # what is missed lies barely further than the true neighbours
    assert dist[:, 1:].mean() < 1.02 * ref_d[:, 1:].mean()
    # a tenth of the lists probed misses neighbours; all of them makes the search exact
    assert _recall(ivf_knn(x, 15, n_lists=80, n_probe=2)[0], ref_i) < _recall(idx, ref_i)
    assert _recall(ivf_knn(x, 15, n_lists=80, n_probe=80)[0], ref_i) > 0.999


def test_ivf_knn_is_deterministic_and_handles_edge_sizes() -> None:
    x = _manifold(700, seed=3)
    a = ivf_knn(x, 10, seed=1)
    b = ivf_knn(x, 10, seed=1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # more lists than points, duplicate rows, k larger than N
    tiny = np.vstack([x[:6], x[:2]])
    idx, dist = ivf_knn(tiny, 20, n_lists=50)
    assert idx.shape == (8, 8) and np.array_equal(idx[:, 0], np.arange(8))
    assert np.all(dist[:, 0] == 0) and np.all(np.isfinite(dist))
    assert sorted(idx[0].tolist()) == list(range(8))


@pytest.mark.parametrize(
    ("x", "k", "match"),
    [
        (np.zeros((5,), np.float32), 3, "shape"),
        (np.zeros((0, 4), np.float32), 3, "shape"),
        (np.zeros((5, 4), np.float32), 0, "positive"),
        (np.zeros((5, 4), np.float32), True, "positive"),
    ],
)
def test_knn_rejects_bad_input(x: np.ndarray, k: int, match: str) -> None:
    for fn in (exact_knn, ivf_knn):
        with pytest.raises(GpfmError, match=match):
            fn(x, k)
