"""Cluster tiles: k-means on features / PCA / UMAP, HDBSCAN on a 2-D embedding.

Labels are renumbered by cluster size (0 = largest), so a colour map keyed on the label
gives the same colours when the same slide is clustered again.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from gpfm_core.analysis._util import as_features
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

#: Above this many points k-means uses MiniBatchKMeans.
MINIBATCH_THRESHOLD = 50_000


def order_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels so that 0 is the largest cluster; ties keep the lower old label first.

    Parameters
    ----------
    labels
        (N,) int labels; negative values (noise) are kept as -1.

    Returns
    -------
    numpy.ndarray
        (N,) int32 labels 0..K-1 (and -1).
    """
    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, dtype=np.int32)
    valid = labels >= 0
    if not valid.any():
        return out
    _uniq, inverse, counts = np.unique(labels[valid], return_inverse=True, return_counts=True)
    # stable sort on -count keeps the lower original label first among equal sizes
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    out[valid] = rank[inverse].astype(np.int32)
    return out


def kmeans_clusters(
    features_or_embedding: np.ndarray, k: int, *, seed: int = 0, n_init: int = 3
) -> np.ndarray:
    """K-means clusters of tiles.

    Parameters
    ----------
    features_or_embedding
        (N, D) float array (features, PCA scores or a 2-D UMAP).
    k
        Number of clusters, 2 <= k <= N.
    seed
        Random seed (results are reproducible for a fixed seed).
    n_init
        Number of k-means++ restarts.

    Returns
    -------
    numpy.ndarray
        (N,) int32 labels in 0..k-1, 0 the largest cluster.
    """
    x = as_features(features_or_embedding, name="features_or_embedding")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= int(k) <= n:
        raise GpfmError(f"k must be an integer between 2 and the number of tiles ({n}), got {k!r}")
    k = int(k)
    if n > MINIBATCH_THRESHOLD:
        from sklearn.cluster import MiniBatchKMeans

        model = MiniBatchKMeans(
            n_clusters=k, random_state=seed, n_init=n_init, batch_size=4096, max_no_improvement=20
        )
    else:
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=k, random_state=seed, n_init=n_init)
    with warnings.catch_warnings():
        # identical rows: sklearn warns that it found fewer clusters; we say it below, once
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        raw = model.fit_predict(x)
    found = np.unique(raw).size
    if found < k:
        log.warning("k-means found %d non-empty clusters of %d requested", found, k)
    return order_by_size(raw)


def density_clusters(
    embedding_2d: np.ndarray,
    *,
    min_cluster_size: int | None = None,
    min_samples: int | None = None,
    cluster_selection_epsilon: float = 0.0,
) -> np.ndarray:
    """HDBSCAN clusters of a low-dimensional embedding (typically the 2-D UMAP).

    Parameters
    ----------
    embedding_2d
        (N, d) float array, small d (2 for UMAP).
    min_cluster_size
        Smallest cluster kept; default ``max(10, N // 200)``.
    min_samples
        HDBSCAN ``min_samples`` (default: ``min_cluster_size``).
    cluster_selection_epsilon
        Merge clusters closer than this distance.

    Returns
    -------
    numpy.ndarray
        (N,) int32 labels, 0 the largest cluster, -1 noise.
    """
    x = as_features(embedding_2d, name="embedding_2d")
    n = x.shape[0]
    if min_cluster_size is None:
        min_cluster_size = max(10, n // 200)
    if isinstance(min_cluster_size, bool) or int(min_cluster_size) < 2:
        raise GpfmError(f"min_cluster_size must be >= 2, got {min_cluster_size!r}")
    if n < int(min_cluster_size):
        raise GpfmError(
            f"{n} tiles are fewer than min_cluster_size={min_cluster_size}: lower min_cluster_size"
        )
    if x.shape[1] > 10:
        log.warning("HDBSCAN on %d dimensions is slow; cluster the 2-D UMAP instead", x.shape[1])
    from sklearn.cluster import HDBSCAN

    model = HDBSCAN(
        min_cluster_size=int(min_cluster_size),
        min_samples=None if min_samples is None else int(min_samples),
        cluster_selection_epsilon=float(cluster_selection_epsilon),
        copy=True,
    )
    raw = model.fit_predict(x.astype(np.float64))
    return order_by_size(raw)
