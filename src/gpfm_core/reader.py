"""Batched, threaded tile reading with bounded memory and ordered output.

:class:`TileBatchReader` reads the tiles of a :class:`~gpfm_core.tiling.TileGrid` in
batches on ``workers`` threads. Each thread opens its own slide handle; at most
``prefetch`` batches are in flight or waiting, so memory stays bounded however fast the
consumer is; batches come out in grid order. Reads go straight to ``read_region`` per
tile (a dask graph per tile costs ~10x more). Errors in a worker are raised in the
consumer; leaving the loop early (``break``, an exception) stops the workers.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np

from gpfm_core.errors import GpfmError, SlideError
from gpfm_core.slide import Slide, open_slide
from gpfm_core.tiling import TileGrid, _check_indices, read_one_tile, read_tiles

__all__ = ["TileBatchReader", "read_tiles"]

log = logging.getLogger(__name__)


class _Handles:
    """One slide handle per worker thread, all closed together."""

    def __init__(self, path: Path, mpp: float | tuple[float, float] | None, slide_id: str) -> None:
        self.path, self.mpp, self.slide_id = path, mpp, slide_id
        self._local = threading.local()
        self._all: list[Slide] = []
        self._lock = threading.Lock()

    def get(self) -> Slide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = open_slide(self.path, mpp=self.mpp)
            with self._lock:
                self._all.append(slide)
            if self.slide_id and slide.slide_id != self.slide_id:
                raise SlideError(
                    f"{self.path.name} (id {slide.slide_id}) is not the slide this tile grid "
                    f"was made for (id {self.slide_id}); make the grid from this slide"
                )
            self._local.slide = slide
        return slide

    def close(self) -> None:
        with self._lock:
            for s in self._all:
                s.close()
            self._all.clear()


def _shutdown(pool: ThreadPoolExecutor, handles: _Handles) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    handles.close()


class TileBatchReader:
    """Iterate over ``(indices, tiles)`` batches of a tile grid.

    Parameters
    ----------
    path
        Slide file the grid was made from (its content id is checked).
    grid
        The tile grid.
    batch_size
        Tiles per batch (the last one may be smaller).
    workers
        Reader threads, each with its own slide handle (>= 1).
    slide_mpp
        µm/px override, as given to :func:`~gpfm_core.slide.open_slide`.
    indices
        Tiles to read, in this order; default every tile of the grid.
    prefetch
        Batches queued ahead of the consumer (default ``2 * workers``).

    Yields
    ------
    indices : numpy.ndarray
        ``(B,)`` int64 tile indices into ``grid``.
    tiles : numpy.ndarray
        ``(B, tile_px, tile_px, 3)`` uint8 RGB, equal to ``read_tiles(slide, grid, indices)``.

    Examples
    --------
    >>> with TileBatchReader("slide.svs", grid, batch_size=64) as reader:  # doctest: +SKIP
    ...     for idx, tiles in reader:
    ...         features[idx] = model(tiles)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        grid: TileGrid,
        *,
        batch_size: int = 64,
        workers: int = 2,
        slide_mpp: float | tuple[float, float] | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        prefetch: int | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise GpfmError(f"batch_size={batch_size} must be at least 1")
        if int(workers) < 1:
            raise GpfmError(f"workers={workers} must be at least 1")
        self.path = Path(path)
        self.grid = grid
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self.prefetch = max(1, int(prefetch) if prefetch is not None else 2 * self.workers)
        order = np.arange(len(grid), dtype=np.int64) if indices is None else indices
        self.indices = _check_indices(grid, order)
        self._handles = _Handles(self.path, slide_mpp, grid.slide_id)
        self._pool: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.indices) // self.batch_size)

    @property
    def n_tiles(self) -> int:
        """Number of tiles the reader yields."""
        return len(self.indices)

    def _read_batch(self, idx: np.ndarray) -> np.ndarray:
        slide = self._handles.get()
        out = np.empty((len(idx), self.grid.tile_px, self.grid.tile_px, 3), np.uint8)
        for k, i in enumerate(idx):
            out[k] = read_one_tile(slide, self.grid, int(i))
        return out

    def _ensure_pool(self) -> ThreadPoolExecutor:
        if self._closed:
            raise GpfmError("this TileBatchReader is closed; create a new one")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gpfm-tiles")
            self._finalizer = weakref.finalize(self, _shutdown, self._pool, self._handles)
        return self._pool

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pool = self._ensure_pool()
        batches = (
            self.indices[i : i + self.batch_size]
            for i in range(0, len(self.indices), self.batch_size)
        )
        pending: deque[tuple[np.ndarray, Future[np.ndarray]]] = deque()
        try:
            for idx in batches:
                pending.append((idx, pool.submit(self._read_batch, idx)))
                if len(pending) >= self.prefetch:
                    done_idx, fut = pending.popleft()
                    yield done_idx, fut.result()
            while pending:
                done_idx, fut = pending.popleft()
                yield done_idx, fut.result()
        finally:
            for _, fut in pending:  # consumer left early or a batch failed
                fut.cancel()
            for _, fut in pending:
                if not fut.cancelled():
                    fut.exception()  # wait for running reads so no thread outlives the loop

    def close(self) -> None:
        """Stop the workers and close every slide handle (idempotent)."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()
        else:
            self._handles.close()

    def __enter__(self) -> TileBatchReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
