"""K-means and HDBSCAN clusters with size-ordered labels."""

from __future__ import annotations

import numpy as np
import pytest

from gpfm_core.analysis import clustering, density_clusters, kmeans_clusters, order_by_size
from gpfm_core.errors import GpfmError


def _blobs_2d(sizes: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pts, lab = [], []
    for i, s in enumerate(sizes):
        centre = np.array([i * 20.0, (i % 2) * 20.0])
        pts.append(centre + rng.normal(size=(s, 2)))
        lab.append(np.full(s, i))
    return np.concatenate(pts).astype(np.float32), np.concatenate(lab)


def test_order_by_size() -> None:
    raw = np.array([5, 5, 2, 2, 2, 9, -1, 9, 9, 9])
    assert order_by_size(raw).tolist() == [2, 2, 1, 1, 1, 0, -1, 0, 0, 0]
    # equal sizes: the lower original label comes first
    assert order_by_size(np.array([3, 1, 3, 1])).tolist() == [1, 0, 1, 0]
    assert order_by_size(np.array([-1, -1])).tolist() == [-1, -1]


def test_kmeans_labels_ordered_by_size_and_recover_blobs() -> None:
    x, truth = _blobs_2d((40, 120, 80))
    labels = kmeans_clusters(x, 3, seed=0)
    assert labels.dtype == np.int32 and labels.shape == (240,)
    counts = np.bincount(labels)
    assert counts.tolist() == [120, 80, 40]
    # blob 1 (120 points) -> label 0, blob 2 -> 1, blob 0 -> 2
    assert np.array_equal(labels, np.array([2, 0, 1])[truth])


def test_kmeans_is_reproducible_and_minibatch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x, truth = _blobs_2d((100, 150, 60))
    a = kmeans_clusters(x, 3, seed=4)
    assert np.array_equal(a, kmeans_clusters(x, 3, seed=4))
    monkeypatch.setattr(clustering, "MINIBATCH_THRESHOLD", 10)  # force MiniBatchKMeans on 310
    b = kmeans_clusters(x, 3, seed=4)
    assert np.array_equal(b, np.array([1, 0, 2])[truth])


@pytest.mark.parametrize("k", [1, 0, 11, 2.5, True])
def test_kmeans_bad_k(k: object) -> None:
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    with pytest.raises(GpfmError, match="between 2 and the number of tiles"):
        kmeans_clusters(x, k)  # type: ignore[arg-type]


def test_density_clusters_find_blobs_and_noise() -> None:
    x, truth = _blobs_2d((60, 150, 100))
    rng = np.random.default_rng(1)
    noise = rng.uniform(-200, 260, size=(5, 2)).astype(np.float32)
    pts = np.vstack([x, noise])
    labels = density_clusters(pts, min_cluster_size=15)
    assert labels.dtype == np.int32
    assert np.array_equal(labels[: x.shape[0]], np.array([2, 0, 1])[truth])
    assert (labels[x.shape[0] :] == -1).all()


def test_density_clusters_bad_input() -> None:
    with pytest.raises(GpfmError, match="min_cluster_size"):
        density_clusters(np.zeros((5, 2), np.float32), min_cluster_size=10)
    with pytest.raises(GpfmError, match="min_cluster_size must be"):
        density_clusters(np.zeros((50, 2), np.float32), min_cluster_size=1)
