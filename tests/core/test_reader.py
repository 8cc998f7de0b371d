"""TileBatchReader: same tiles as read_tiles, ordered, bounded, closes cleanly."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from gpfm_core.errors import GpfmError, SlideError
from gpfm_core.reader import TileBatchReader
from gpfm_core.slide import open_slide
from gpfm_core.tiling import TileGrid, make_tile_grid, read_tiles


@pytest.fixture(scope="module")
def pyramid_grid(small_pyramid: Path) -> TileGrid:
    with open_slide(small_pyramid) as s:
        return make_tile_grid(s, mpp=0.75, tile_px=128, tissue=False)  # resampled tiles


@pytest.fixture(scope="module")
def expected(small_pyramid: Path, pyramid_grid: TileGrid) -> np.ndarray:
    with open_slide(small_pyramid) as s:
        return read_tiles(s, pyramid_grid)


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gpfm-tiles")]


@pytest.mark.parametrize(("workers", "batch_size"), [(1, 16), (2, 7), (2, 1000)])
def test_batches_reproduce_read_tiles(
    small_pyramid: Path, pyramid_grid: TileGrid, expected: np.ndarray, workers: int, batch_size: int
) -> None:
    n = len(pyramid_grid)
    assert n > 20 and pyramid_grid.read_size != pyramid_grid.tile_px
    seen_idx, seen_tiles = [], []
    with TileBatchReader(small_pyramid, pyramid_grid, batch_size=batch_size, workers=workers) as r:
        assert len(r) == -(-n // batch_size) and r.n_tiles == n
        for idx, tiles in r:
            assert idx.dtype == np.int64 and tiles.dtype == np.uint8
            assert tiles.shape == (len(idx), 128, 128, 3) and len(idx) <= batch_size
            seen_idx.append(idx)
            seen_tiles.append(tiles)
    np.testing.assert_array_equal(np.concatenate(seen_idx), np.arange(n))
    np.testing.assert_array_equal(np.concatenate(seen_tiles), expected)
    assert not _reader_threads()


def test_custom_order_and_subset(
    small_pyramid: Path, pyramid_grid: TileGrid, expected: np.ndarray
) -> None:
    order = np.array([9, 3, 3, 0, len(pyramid_grid) - 1])
    with TileBatchReader(small_pyramid, pyramid_grid, batch_size=2, indices=order) as r:
        out = list(r)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in out]), order)
    from gpfm_core import tiling

    assert tiling.TileBatchReader is TileBatchReader  # re-exported lazily
    np.testing.assert_array_equal(np.concatenate([t for _, t in out]), expected[order])


class _CountingReader(TileBatchReader):
    """Counts batch reads to check the prefetch bound (real reads, no stubs)."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.started = 0
        self._count_lock = threading.Lock()

    def _read_batch(self, idx: np.ndarray) -> np.ndarray:
        with self._count_lock:
            self.started += 1
        return super()._read_batch(idx)


def test_prefetch_is_bounded_and_early_exit_closes(
    small_pyramid: Path, pyramid_grid: TileGrid
) -> None:
    r = _CountingReader(small_pyramid, pyramid_grid, batch_size=2, workers=2, prefetch=3)
    assert len(r) > 10
    it = iter(r)
    next(it)
    next(it)
    # while the consumer holds batch 2, at most 2 + prefetch batches were ever requested
    assert r.started <= 2 + 3
    it.close()  # leave the loop early
    r.close()
    assert r.started < len(r)
    assert not _reader_threads()
    assert r._handles._all == []
    with pytest.raises(GpfmError, match="closed"):
        next(iter(r))


def test_break_inside_with_block(small_pyramid: Path, pyramid_grid: TileGrid) -> None:
    with TileBatchReader(small_pyramid, pyramid_grid, batch_size=4, workers=2) as r:
        for k, _ in enumerate(r):
            if k == 1:
                break
    assert not _reader_threads()


def test_worker_error_reaches_consumer(cmu_svs: Path, pyramid_grid: TileGrid) -> None:
    # a grid made for another slide: the worker refuses, the consumer sees one SlideError
    with (
        TileBatchReader(cmu_svs, pyramid_grid, batch_size=4, workers=2) as r,
        pytest.raises(SlideError, match="not the slide this tile grid was made for"),
    ):
        for _ in r:
            pass
    assert not _reader_threads()


def test_slide_mpp_override_for_images(he_png: Path) -> None:
    with open_slide(he_png, mpp=0.5) as s:
        g = make_tile_grid(s, tissue=False)
        ref = read_tiles(s, g)
    with TileBatchReader(he_png, g, batch_size=5, slide_mpp=0.5) as r:
        got = np.concatenate([t for _, t in r])
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"batch_size": 0}, "batch_size"), ({"workers": 0}, "workers")]
)
def test_bad_reader_arguments(
    small_pyramid: Path, pyramid_grid: TileGrid, kwargs, match: str
) -> None:
    with pytest.raises(GpfmError, match=match):
        TileBatchReader(small_pyramid, pyramid_grid, **kwargs)
