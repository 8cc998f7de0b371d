"""Dimensionality reduction of tile embeddings: PCA and UMAP.

Progress
--------
umap-learn (>= 0.5) draws its epoch bar with ``tqdm(range(n_epochs), **tqdm_kwds)``. We pass
``tqdm_kwds={"file": sink, "bar_format": "{n}/{total}", "disable": False, ...}`` where ``sink``
is a small file-like object that parses ``"<done>/<total>"`` from what tqdm writes and calls
``progress("optimise", done / total)``. No monkeypatching, no chunked epochs (results are
identical with or without a callback; a test checks it). The stages reported are
``("pca", 0.0 .. 1.0)``, ``("knn", 0.0)`` (neighbour graph + spectral init, no finer grain is
exposed by umap-learn) and ``("optimise", epoch fraction)`` ending at 1.0. Under an IPython
kernel ``tqdm.auto`` may pick the notebook bar, which ignores ``file``: the callback then only
sees the stage boundaries.

Cancel
------
``umap_embed(..., cancel=event)`` stops a run asked to stop (a :class:`threading.Event` or a
callable returning True) by raising :class:`UmapCancelled`: between the steps (PCA, neighbour
graph, layout) and, inside the layout, after the current epoch. umap-learn runs the layout
epoch by epoch from Python (``umap.layouts.optimize_layout_euclidean``:
``for n in tqdm(range(n_epochs), **tqdm_kwds)``), and the same tqdm sink that reports
progress is told to write after *every* epoch (``miniters=1``, ``mininterval=0``); when the
cancel is set it raises from that write, which unwinds umap-learn's epoch loop. Nothing of
umap-learn is patched or re-implemented, and a run that is not cancelled is unchanged. The
graph and spectral steps inside umap-learn (a few seconds at 100,000 tiles) cannot be
interrupted; the check follows them. A test asserts that a cancel set at epoch k stops the
layout by epoch k + 1.

tqdm (4.x) ``refresh()`` takes tqdm's process-wide write lock and releases it only when the
write returns, so the raising write leaves it held by the UMAP thread, and every other tqdm
bar (napari's progress bars are tqdm) would then block forever. :func:`umap_embed` releases
that one level right after the cancel unwinds (an ``RuntimeError`` from the release means
it was not held: nothing to do); a test checks the lock is free afterwards.

Reproducibility and threads
---------------------------
With an int ``seed`` umap-learn runs single-threaded (``random_state`` disables its parallel
SGD); we pass ``n_jobs=1`` explicitly so it does not warn. ``seed=None`` uses every core and is
not reproducible. Measured for 100,000 x 1024 on 2 cores with 200 layout epochs (load
average ~1.2): seed=0 87-91 s, seed=None 93 s; both spend 75-80 s in the layout, which
umap-learn's parallel SGD does not speed up on 2 cores. Default: ``seed=0``
(reproducible: the same picture every time the pathologist reopens a slide, at no real
cost).

Layout epochs
-------------
The layout's cost is linear in epochs x edges; at 100,000 tiles umap-learn's 200 epochs take
75-90 s of a ~100 s UMAP on the benchmark machine, too long for a pathologist waiting in the
dock. Above 50,000 tiles the default is therefore 100 epochs: measured side by side on
100,000 tiles, 50 s instead of 82 s in total, with nearly the same picture (on a 3-d manifold
in 50-d: 15-neighbour preservation 0.31 vs 0.33, rank correlation of 2-D with true distances
0.705 vs 0.699). ``n_epochs=200`` asks for umap-learn's full layout.

Neighbour graph
---------------
umap-learn never searches neighbours itself here: below 4,096 tiles it would compute all
pairwise distances through sklearn with its numba distance as a Python callable (~50 s for
3,000 tiles), so we hand it the BLAS distances as ``metric="precomputed"`` (same graph,
milliseconds). Above that it would run NN-descent (pynndescent), whose numba kernels take the
distance as an argument, cannot be cached and recompile in every process (43 s on the
benchmark machine). Instead the graph comes from :mod:`gpfm_core.analysis.knn` as
``precomputed_knn``: exact (:func:`exact_knn`, blocked brute force in torch, ~6 s at 30,000)
up to 30,000 tiles, an inverted-file search (:func:`ivf_knn`, ~8 s at 100,000) above. No
neighbour-search compile is paid, in the first UMAP of a session or later.

numba cache
-----------
umap-learn compiles numba kernels on first use (pynndescent's, ``cache=True``, are imported
with it and land in ``NUMBA_CACHE_DIR``, which the Makefile sets to ``.cache/numba``); its
own kernels (layout SGD, fuzzy simplicial set, distances) are plain ``@numba.njit``.
:func:`enable_umap_numba_cache` (called by :func:`umap_embed` right after importing umap)
calls ``Dispatcher.enable_caching()`` on every not-yet-compiled numba dispatcher defined in
``umap.layouts``, ``umap.umap_``, ``umap.utils``, ``umap.distances`` and ``umap.sparse``, so
they are cached in ``NUMBA_CACHE_DIR`` too and a later process loads them instead of
compiling. Failures (another umap-learn or numba version, an unwritable cache) are logged
and ignored: the kernels are then simply compiled as before. ``benchmarks/bench_analysis.py``
measures a cold and a cached first call in fresh subprocesses.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Callable

import numpy as np

from gpfm_core.analysis._util import as_features
from gpfm_core.analysis.knn import exact_knn, ivf_knn
from gpfm_core.errors import GpfmError

__all__ = [
    "UmapCancelled",
    "default_umap_epochs",
    "enable_umap_numba_cache",
    "exact_knn",
    "ivf_knn",
    "pca_reduce",
    "umap_embed",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]
CancelLike = threading.Event | Callable[[], bool]
_COUNT = re.compile(r"(\d+)/(\d+)")


class UmapCancelled(GpfmError):
    """:func:`umap_embed` stopped because its ``cancel`` was set; nothing is returned."""


def _cancel_check(cancel: CancelLike | None) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise GpfmError(f"cancel must be a threading.Event or a callable, not {type(cancel).__name__}")


class _TqdmSink:
    """File-like object handed to tqdm; turns ``"n/total"`` writes into progress calls.

    ``epochs`` counts the layout epochs finished (the highest ``n`` written). When
    ``cancelled()`` turns True, the next write raises :class:`UmapCancelled` (once: tqdm's
    clean-up writes after it pass), which stops umap-learn's epoch loop.
    """

    def __init__(self, progress: ProgressFn, cancelled: Callable[[], bool]) -> None:
        self._progress = progress
        self._cancelled = cancelled
        self.last = -1.0
        self.epochs = 0
        self.raised = False

    def write(self, text: str) -> int:
        found = _COUNT.findall(text)
        if found:
            done, total = (int(v) for v in found[-1])
            self.epochs = max(self.epochs, done)
            if total > 0:
                frac = min(done / total, 1.0)
                if frac > self.last:
                    self.last = frac
                    self._progress("optimise", frac)
        # the message must not say "closed": tqdm turns such ValueErrors into "disable the bar"
        if not self.raised and self._cancelled():
            self.raised = True
            raise UmapCancelled(f"UMAP cancelled after {self.epochs} layout epochs")
        return len(text)

    def flush(self) -> None:
        """Nothing buffered."""


def _release_tqdm_lock() -> None:
    """Release the level of tqdm's write lock left held by a write that raised (see above)."""
    from tqdm.auto import tqdm

    try:
        tqdm.get_lock().release()
    except (RuntimeError, AssertionError):  # not held by this thread: nothing leaked
        log.debug("tqdm lock was not held after the UMAP cancel")


#: Below this many tiles umap-learn computes exact pairwise distances (we hand it BLAS ones).
_UMAP_SMALL_DATA = 4096
#: Up to this many tiles the neighbour graph is exact (:func:`exact_knn`), above it IVF.
_EXACT_KNN_MAX = 30_000
#: Above this many tiles the default layout runs ``_LARGE_EPOCHS`` epochs (see the docstring).
_LARGE_UMAP = 50_000
_LARGE_EPOCHS = 100
_UMAP_NUMBA_MODULES = ("umap.layouts", "umap.umap_", "umap.utils", "umap.distances", "umap.sparse")
_numba_cache_state: dict[str, int] | None = None


def enable_umap_numba_cache() -> dict[str, int]:
    """Make umap-learn's numba kernels cache their machine code across sessions.

    Idempotent; must run before the kernels' first compile in this process (those already
    compiled are skipped). Never raises: any failure is logged and caching is left off.

    Returns
    -------
    dict
        ``{"enabled": n, "skipped": m, "failed": f}`` counts of dispatchers.
    """
    global _numba_cache_state
    if _numba_cache_state is not None:
        return _numba_cache_state
    state = {"enabled": 0, "skipped": 0, "failed": 0}
    try:
        import importlib

        from numba.core.caching import NullCache
        from numba.core.registry import CPUDispatcher

        for mod_name in _UMAP_NUMBA_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except Exception as exc:  # an optional speed-up only
                log.info("numba cache: cannot import %s (%s)", mod_name, exc)
                continue
            for name, obj in vars(mod).items():
                if not isinstance(obj, CPUDispatcher) or obj.__module__ != mod_name:
                    continue
                if not isinstance(getattr(obj, "_cache", None), NullCache) or obj.overloads:
                    state["skipped"] += 1  # already cached, or compiled in this process
                    continue
                try:
                    obj.enable_caching()
                    state["enabled"] += 1
                except Exception as exc:  # not cacheable: compiled as before
                    state["failed"] += 1
                    log.debug("numba cache: %s.%s not cacheable (%s)", mod_name, name, exc)
    except Exception as exc:  # numba internals moved: compile as before
        log.warning(
            "numba cache for umap-learn not enabled (%s): kernels compile each session", exc
        )
    log.debug("numba cache for umap-learn: %s", state)
    _numba_cache_state = state
    return state


def default_umap_epochs(n_tiles: int) -> int | None:
    """Layout epochs :func:`umap_embed` uses when none are given.

    ``None`` (umap-learn's own choice: 500 up to 10,000 tiles, 200 above) up to 50,000 tiles;
    100 above, where the layout dominates a slide's UMAP (see the module docstring).
    """
    return _LARGE_EPOCHS if int(n_tiles) > _LARGE_UMAP else None


def pca_reduce(
    features: np.ndarray, *, n_components: int = 50, seed: int = 0, fit_rows: int | None = 20_000
) -> np.ndarray:
    """Project features onto their first principal components.

    Parameters
    ----------
    features
        (N, D) float array, one embedding per tile.
    n_components
        Wanted output width; the result has ``k = min(n_components, N, D)`` columns.
    seed
        Seed of the randomized SVD and of the row subsample.
    fit_rows
        Fit the components on this many randomly chosen rows (then project every row);
        ``None`` fits on all rows. 20,000 tiles pin down 50 components of a slide well and
        make PCA of 100,000 x 1024 several times faster.

    Returns
    -------
    numpy.ndarray
        (N, k) float32 scores.
    """
    x = as_features(features)
    if isinstance(n_components, bool) or int(n_components) < 1:
        raise GpfmError(f"n_components must be >= 1, got {n_components!r}")
    n, d = x.shape
    k = min(int(n_components), n, d)
    if n == 1:  # one tile is its own mean: its scores are 0 (sklearn would divide by N - 1 = 0)
        return np.zeros((1, k), dtype=np.float32)
    from sklearn.decomposition import PCA

    # randomized SVD is far faster than a full SVD when k << min(N, D)
    solver = "randomized" if k < 0.8 * min(n, d) else "full"
    pca = PCA(n_components=k, svd_solver=solver, random_state=seed)
    if fit_rows is not None and n > int(fit_rows) >= k:
        rows = np.random.default_rng(seed).choice(n, int(fit_rows), replace=False)
        pca.fit(x[np.sort(rows)])
        out = pca.transform(x)
    else:
        out = pca.fit_transform(x)
    log.debug("PCA %s -> %d components (%s, fit_rows=%s)", x.shape, k, solver, fit_rows)
    return np.ascontiguousarray(out, dtype=np.float32)


def umap_embed(
    features: np.ndarray,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    pca_dim: int | None = 50,
    seed: int | None = 0,
    progress: ProgressFn | None = None,
    n_epochs: int | None = None,
    cancel: CancelLike | None = None,
    epochs_run: list[int] | None = None,
) -> np.ndarray:
    """Embed tiles in 2-D with UMAP (optionally after PCA).

    Parameters
    ----------
    features
        (N, D) float array, N >= 4, not all rows identical.
    n_neighbors
        UMAP neighbourhood size; lowered to N - 1 (with a warning) on tiny inputs.
    min_dist
        UMAP ``min_dist``.
    pca_dim
        Reduce to this many PCA components first when D is larger; ``None`` skips PCA.
    seed
        int: reproducible, single-threaded. ``None``: all cores, not reproducible.
    progress
        Called as ``progress(stage, fraction)`` with stage "pca", "knn", "optimise".
    n_epochs
        Optimisation epochs; None = :func:`default_umap_epochs` (umap-learn's 500 / 200 up
        to 50,000 tiles, 100 above). Pass 200 for umap-learn's full layout of a large slide.
    cancel
        A :class:`threading.Event` (or a callable returning True) that stops the run between
        steps and after the current layout epoch (see the module docstring).
    epochs_run
        When given, a list to which the number of layout epochs run is appended (also when
        cancelled).

    Returns
    -------
    numpy.ndarray
        (N, 2) float32 coordinates.

    Raises
    ------
    UmapCancelled
        ``cancel`` was set before the layout finished.
    """
    x = as_features(features)
    n = x.shape[0]
    if n < 4:  # umap-learn's spectral start needs more points than its 2 + 1 eigenvectors
        raise GpfmError(f"UMAP needs at least 4 tiles, got {n}: embed a larger region")
    if isinstance(n_neighbors, bool) or int(n_neighbors) < 2:
        raise GpfmError(f"n_neighbors must be >= 2, got {n_neighbors!r}")
    if not 0.0 <= float(min_dist) <= 1.0:
        raise GpfmError(f"min_dist must lie in [0, 1], got {min_dist!r}")
    n_neighbors = int(n_neighbors)
    if n_epochs is not None and (isinstance(n_epochs, bool) or int(n_epochs) < 1):
        raise GpfmError(f"n_epochs must be a positive integer or None, got {n_epochs!r}")
    if not np.ptp(x, axis=0).any():
        raise GpfmError(
            f"all {n} tiles have identical features: there is nothing to lay out; check the embedding"
        )
    if n_neighbors >= n:
        warnings.warn(
            f"n_neighbors={n_neighbors} >= number of tiles {n}; using {n - 1}",
            stacklevel=2,
        )
        n_neighbors = n - 1
    report: ProgressFn = progress if progress is not None else (lambda _s, _f: None)
    cancelled = _cancel_check(cancel)

    def stop_if_cancelled(step: str) -> None:
        if cancelled():
            raise UmapCancelled(f"UMAP cancelled before {step}")

    stop_if_cancelled("PCA")
    if pca_dim is not None and x.shape[1] > int(pca_dim):
        report("pca", 0.0)
        x = pca_reduce(x, n_components=int(pca_dim), seed=0 if seed is None else seed)
        report("pca", 1.0)
    stop_if_cancelled("the neighbour graph")

    import umap  # lazy: pulls numba / pynndescent

    enable_umap_numba_cache()

    sink = _TqdmSink(report, cancelled)
    watched = progress is not None or cancel is not None
    tqdm_kwds = {
        "file": sink,
        "bar_format": "{n}/{total}",
        "disable": not watched,
        # with a cancel: a write after every epoch (a few µs), so a cancel stops within one
        "mininterval": 0.0 if cancel is not None else 0.1,
        "miniters": 1 if cancel is not None else None,
        "ascii": True,
        "leave": False,
    }
    report("knn", 0.0)
    # umap-learn computes all pairwise distances below 4096 points (its "small data" path), but
    # through sklearn with its numba distance as a Python callable: one Python call per pair
    # (~50 s for 3,000 tiles). The same distances from BLAS, passed as "precomputed", take
    # milliseconds and give the same neighbour graph.
    precomputed = n < _UMAP_SMALL_DATA
    if precomputed:
        from sklearn.metrics import pairwise_distances

        x = pairwise_distances(x, metric="euclidean").astype(np.float32)
        np.fill_diagonal(x, 0.0)
    # Above that, the neighbour graph comes from torch (see the module docstring): exact up to
    # 30,000 tiles, an inverted-file search beyond; umap-learn's NN-descent never runs.
    knn: tuple[np.ndarray, np.ndarray] | tuple[None, None, None] = (None, None, None)
    if not precomputed:
        knn = exact_knn(x, n_neighbors) if n <= _EXACT_KNN_MAX else ivf_knn(x, n_neighbors)
    stop_if_cancelled("the layout")
    reducer = umap.UMAP(
        precomputed_knn=knn,
        metric="precomputed" if precomputed else "euclidean",
        n_neighbors=n_neighbors,
        min_dist=float(min_dist),
        n_components=2,
        random_state=seed,
        n_jobs=1 if seed is not None else -1,
        n_epochs=default_umap_epochs(n) if n_epochs is None else int(n_epochs),
        tqdm_kwds=tqdm_kwds,
        verbose=False,
    )
    with warnings.catch_warnings():
        # belt and braces: n_jobs=1 with a seed already avoids umap-learn's n_jobs warning
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        warnings.filterwarnings("ignore", message=".*precomputed metric.*")
        # we never call transform(): no search index is needed with our own graph
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        try:
            out = reducer.fit_transform(x)
        except UmapCancelled:
            if sink.raised:
                _release_tqdm_lock()
            raise
        finally:
            if epochs_run is not None:
                epochs_run.append(sink.epochs)
    stop_if_cancelled("returning")  # set during the last epoch: the caller asked to stop
    report("optimise", 1.0)
    log.info("UMAP of %d tiles done (n_neighbors=%d, seed=%s)", n, n_neighbors, seed)
    return np.ascontiguousarray(out, dtype=np.float32)
