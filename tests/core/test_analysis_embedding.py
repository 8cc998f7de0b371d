"""PCA and UMAP of tile embeddings (real scikit-learn / umap-learn on small data)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gpfm_core.analysis import kmeans_clusters, pca_reduce, umap_embed
from gpfm_core.errors import GpfmError


def _blobs(n: int = 300, d: int = 64, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, d))
    y = np.arange(n) % k
    x = centres[y] + rng.normal(size=(n, d))
    return x.astype(np.float32), y


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of points whose cluster maps to the majority true label (purity)."""
    total = 0
    for c in np.unique(a):
        total += np.bincount(b[a == c]).max()
    return total / a.size


def test_pca_shape_dtype_and_variance_order() -> None:
    x, _ = _blobs()
    out = pca_reduce(x, n_components=10)
    assert out.shape == (300, 10) and out.dtype == np.float32
    var = out.var(axis=0)
    assert np.all(np.diff(var) <= 1e-3 * var[0])  # decreasing explained variance
    # projections are centred and the first component carries the most variance
    assert np.allclose(out.mean(axis=0), 0, atol=1e-3 * float(np.abs(out).max()))


def test_pca_component_count_is_clamped() -> None:
    x, _ = _blobs(n=20, d=8)
    assert pca_reduce(x, n_components=50).shape == (20, 8)
    assert pca_reduce(x[:5], n_components=50).shape == (5, 5)


def test_pca_rejects_bad_input() -> None:
    with pytest.raises(GpfmError, match="2-D"):
        pca_reduce(np.zeros(10, np.float32))
    bad = np.ones((5, 3), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(GpfmError, match="NaN"):
        pca_reduce(bad)
    with pytest.raises(GpfmError, match="n_components"):
        pca_reduce(np.ones((5, 3), np.float32), n_components=0)


def test_umap_separates_clusters_and_is_reproducible() -> None:
    x, y = _blobs()
    a = umap_embed(x, n_neighbors=10, pca_dim=20, seed=3)
    b = umap_embed(x, n_neighbors=10, pca_dim=20, seed=3)
    assert a.shape == (300, 2) and a.dtype == np.float32
    assert np.array_equal(a, b)
    labels = kmeans_clusters(a, 3, seed=0)
    assert _agreement(labels, y) > 0.95


def test_umap_progress_stages_and_identical_result() -> None:
    x, _ = _blobs(n=200)
    calls: list[tuple[str, float]] = []
    with_cb = umap_embed(
        x, n_neighbors=8, pca_dim=16, seed=1, progress=lambda s, f: calls.append((s, f))
    )
    without = umap_embed(x, n_neighbors=8, pca_dim=16, seed=1)
    assert np.array_equal(with_cb, without)
    stages = [s for s, _ in calls]
    assert stages[:3] == ["pca", "pca", "knn"]
    opt = [f for s, f in calls if s == "optimise"]
    assert len(opt) >= 2, calls  # tqdm's first write and our final 1.0
    assert opt[-1] == 1.0 and all(np.diff(opt) >= 0) and all(0 <= f <= 1 for f in opt)
    assert stages.index("optimise") > stages.index("knn")


def test_umap_small_input_clamps_neighbours_with_warning() -> None:
    x, _ = _blobs(n=12, d=6)
    with pytest.warns(UserWarning, match="n_neighbors"):
        out = umap_embed(x, n_neighbors=15, pca_dim=None, seed=0)
    assert out.shape == (12, 2) and np.isfinite(out).all()


def test_umap_rejects_bad_input() -> None:
    with pytest.raises(GpfmError, match="at least 4"):
        umap_embed(np.ones((3, 4), np.float32))
    with pytest.raises(GpfmError, match="n_neighbors"):
        umap_embed(np.ones((20, 4), np.float32), n_neighbors=1)
    with pytest.raises(GpfmError, match="min_dist"):
        umap_embed(np.ones((20, 4), np.float32), min_dist=2.0)
    with pytest.raises(GpfmError, match="n_epochs"):
        umap_embed(np.ones((20, 4), np.float32), n_epochs=0)


def test_import_analysis_is_light() -> None:
    code = (
        "import sys, gpfm_core.analysis;"
        "print(','.join(m for m in ('torch', 'umap', 'sklearn', 'numba', 'skimage', 'safetensors')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_pca_subsampled_fit_spans_same_subspace() -> None:
    x, _ = _blobs(n=2000, d=40, k=4)
    full = pca_reduce(x, n_components=3, fit_rows=None)
    sub = pca_reduce(x, n_components=3, fit_rows=500)
    assert sub.shape == full.shape
    # same 3-d subspace up to rotation/sign: least-squares map from one to the other fits well
    coef, *_ = np.linalg.lstsq(full, sub, rcond=None)
    resid = np.linalg.norm(full @ coef - sub) / np.linalg.norm(sub)
    assert resid < 0.05
    assert np.array_equal(sub, pca_reduce(x, n_components=3, fit_rows=500))


def test_umap_numba_kernels_are_cached_on_disk() -> None:
    from pathlib import Path

    from numba.core.caching import NullCache

    from gpfm_core.analysis.embedding import enable_umap_numba_cache

    state = enable_umap_numba_cache()
    assert state["enabled"] + state["skipped"] > 0 and state["failed"] == 0
    import umap.layouts
    import umap.umap_

    for disp in (
        umap.layouts._nb_optimize_layout_euclidean_single_epoch,
        umap.layouts._nb_optimize_layout_euclidean_single_epoch_parallel,
        umap.umap_.smooth_knn_dist,
        umap.umap_.compute_membership_strengths,
    ):
        assert not isinstance(disp._cache, NullCache), disp
    x, _ = _blobs(n=100, d=8)
    umap_embed(x, n_neighbors=5, pca_dim=None, seed=0, n_epochs=20)
    layout = umap.layouts._nb_optimize_layout_euclidean_single_epoch
    cache_dir = Path(layout._cache._cache_path)
    stem = f"layouts.{layout.py_func.__qualname__}-"  # numba names files after py_func
    assert list(cache_dir.glob(f"{stem}*.nbi")), sorted(cache_dir.iterdir())
    assert list(cache_dir.glob(f"{stem}*.nbc")), sorted(cache_dir.iterdir())
    assert enable_umap_numba_cache() is state  # idempotent


def test_umap_on_exact_knn_path_separates_clusters() -> None:
    x, y = _blobs(n=4500, d=32, k=3)  # above umap-learn's 4096-point "small data" path
    out = umap_embed(x, n_neighbors=10, pca_dim=16, seed=0, n_epochs=50)
    assert out.shape == (4500, 2) and np.isfinite(out).all()
    assert _agreement(kmeans_clusters(out, 3, seed=0), y) > 0.95


def test_umap_on_ivf_knn_path_separates_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the exact-search limit the graph comes from ivf_knn, never from NN-descent."""
    import pynndescent

    from gpfm_core.analysis import embedding

    monkeypatch.setattr(embedding, "_EXACT_KNN_MAX", 1000)  # our own threshold, not a library
    built: list[object] = []
    original_init = pynndescent.NNDescent.__init__

    def _count(self, *args, **kwargs):  # records real constructions; behaviour unchanged
        built.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(pynndescent.NNDescent, "__init__", _count)
    x, y = _blobs(n=4500, d=32, k=3)
    out = umap_embed(x, n_neighbors=10, pca_dim=16, seed=0, n_epochs=50)
    assert out.shape == (4500, 2) and np.isfinite(out).all()
    assert _agreement(kmeans_clusters(out, 3, seed=0), y) > 0.95
    assert built == []


def test_large_slides_default_to_a_shorter_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above 50,000 tiles the default layout runs 100 epochs; smaller sets keep umap-learn's."""
    from gpfm_core.analysis import embedding
    from gpfm_core.analysis.embedding import default_umap_epochs

    assert default_umap_epochs(3_000) is None and default_umap_epochs(50_000) is None
    assert default_umap_epochs(50_001) == 100 == default_umap_epochs(250_000)
    # umap_embed applies it (seeded runs are deterministic): with our own threshold lowered,
    # the default run is the 100-epoch run, not umap-learn's 500-epoch one
    x, _ = _blobs(n=300, d=8)
    full = umap_embed(x, n_neighbors=5, pca_dim=None, seed=0)
    monkeypatch.setattr(embedding, "_LARGE_UMAP", 200)
    short = umap_embed(x, n_neighbors=5, pca_dim=None, seed=0)
    assert np.array_equal(short, umap_embed(x, n_neighbors=5, pca_dim=None, seed=0, n_epochs=100))
    assert not np.array_equal(short, full)
    assert np.array_equal(full, umap_embed(x, n_neighbors=5, pca_dim=None, seed=0, n_epochs=500))


@pytest.mark.parametrize("stop_at", [0, 1, 37, 120])
def test_umap_cancel_stops_the_layout_within_one_epoch(stop_at: int) -> None:
    """A cancel set after layout epoch k (seen through progress) stops UMAP by epoch k + 1."""
    import threading

    from gpfm_core.analysis.embedding import UmapCancelled

    x, _ = _blobs(n=200)
    n_epochs = 200
    cancel = threading.Event()

    def progress(stage: str, frac: float) -> None:
        if stage == "optimise" and round(frac * n_epochs) >= stop_at:
            cancel.set()

    runs: list[int] = []
    with pytest.raises(UmapCancelled, match="cancelled"):
        umap_embed(
            x, n_neighbors=8, pca_dim=16, seed=1, n_epochs=n_epochs, progress=progress,
            cancel=cancel, epochs_run=runs,
        )  # fmt: skip
    assert len(runs) == 1 and stop_at <= runs[0] <= stop_at + 1, runs


def test_umap_cancel_between_steps_and_unset_cancel_changes_nothing() -> None:
    import threading

    from gpfm_core.analysis.embedding import UmapCancelled

    x, _ = _blobs(n=200)
    stopped = threading.Event()
    stopped.set()
    runs: list[int] = []
    with pytest.raises(UmapCancelled, match="before PCA"):
        umap_embed(x, pca_dim=16, cancel=stopped, epochs_run=runs)
    assert runs == []  # stopped before any layout
    # a callable works too; stop after PCA, before the neighbour graph
    seen: list[str] = []
    with pytest.raises(UmapCancelled, match="neighbour graph"):
        umap_embed(
            x, pca_dim=16, progress=lambda s, _f: seen.append(s), cancel=lambda: "pca" in seen
        )
    # never set: the same layout as without a cancel, every epoch run
    runs = []
    a = umap_embed(x, n_neighbors=8, pca_dim=16, seed=1, n_epochs=60, cancel=threading.Event(), epochs_run=runs)
    b = umap_embed(x, n_neighbors=8, pca_dim=16, seed=1, n_epochs=60)
    assert np.array_equal(a, b) and runs == [60]
    with pytest.raises(GpfmError, match="cancel must be"):
        umap_embed(x, cancel="yes")  # type: ignore[arg-type]


def test_umap_cancelled_in_a_thread_leaves_the_tqdm_lock_free() -> None:
    """The cancel unwinds through tqdm; its process-wide lock must not stay held (napari's
    progress bars, which are tqdm, would block on it forever)."""
    import threading

    from tqdm.std import TqdmDefaultWriteLock

    from gpfm_core.analysis.embedding import UmapCancelled

    x, _ = _blobs(n=200)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            umap_embed(
                x, pca_dim=16, n_epochs=100, cancel=cancel,
                progress=lambda s, f: cancel.set() if s == "optimise" and f > 0.2 else None,
            )  # fmt: skip
        except BaseException as exc:  # the assertion below names it
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert len(outcome) == 1 and isinstance(outcome[0], UmapCancelled), outcome
    for lock in (TqdmDefaultWriteLock.th_lock, getattr(TqdmDefaultWriteLock, "mp_lock", None)):
        if lock is None:
            continue
        got = lock.acquire(timeout=30)  # free: at once; leaked by the worker: never
        assert got, "tqdm's write lock is still held by the cancelled UMAP thread"
        lock.release()
