"""Tile values -> raster and the raster's placement over the slide in napari."""

from __future__ import annotations

import numpy as np
import pytest

from gpfm_core.analysis import tile_layer_placement, tiles_to_raster
from gpfm_core.errors import GpfmError


def test_scalar_and_vector_values() -> None:
    grid_rc = np.array([[0, 0], [1, 2], [2, 1]], np.int64)
    r = tiles_to_raster(np.array([1.5, 2.5, 3.5], np.float32), grid_rc, (3, 4))
    assert r.shape == (3, 4) and r.dtype == np.float32
    assert r[0, 0] == 1.5 and r[1, 2] == 2.5 and r[2, 1] == 3.5
    assert np.isnan(r).sum() == 9
    lab = tiles_to_raster(np.array([1, 2, 3]), grid_rc, (3, 4), dtype=np.uint8)
    assert lab.dtype == np.uint8 and lab.sum() == 6 and lab[1, 2] == 2
    rgb = tiles_to_raster(np.arange(9, dtype=np.float32).reshape(3, 3), grid_rc, (3, 4), fill=0.0)
    assert (
        rgb.shape == (3, 4, 3)
        and rgb[2, 1].tolist() == [6, 7, 8]
        and rgb[0, 1].tolist() == [0, 0, 0]
    )


def test_matches_loop_on_random_grid() -> None:
    rng = np.random.default_rng(0)
    cells = rng.choice(50 * 70, 900, replace=False)
    grid_rc = np.stack([cells // 70, cells % 70], axis=1)
    vals = rng.random(900).astype(np.float32)
    fast = tiles_to_raster(vals, grid_rc, (50, 70), fill=-1.0)
    slow = np.full((50, 70), -1.0, np.float32)
    for (row, col), v in zip(grid_rc, vals, strict=True):
        slow[row, col] = v
    assert np.array_equal(fast, slow)


def test_bad_input() -> None:
    with pytest.raises(GpfmError, match="outside grid_shape"):
        tiles_to_raster(np.ones(1), np.array([[3, 0]]), (3, 4))
    with pytest.raises(GpfmError, match="same slide"):
        tiles_to_raster(np.ones(2), np.array([[0, 0]]), (3, 4))
    with pytest.raises(GpfmError, match="fill=NaN"):
        tiles_to_raster(np.ones(1), np.array([[0, 0]]), (3, 4), fill=np.nan, dtype=np.int32)
    with pytest.raises(GpfmError, match="mpp"):
        tile_layer_placement(stride_level0=10, mpp=(0.0, 0.5))


def _napari_extent(index: int, scale: float, translate: float) -> tuple[float, float]:
    """World extent of data pixel ``index``: napari centres it at index * scale + translate."""
    centre = index * scale + translate
    return centre - scale / 2, centre + scale / 2


@pytest.mark.parametrize(
    ("stride", "origin", "mpp"),
    [(224, (0, 0), (0.5, 0.5)), (7, (13, 5), (0.25, 0.4)), (1, (0, 0), None)],
)
def test_raster_pixel_covers_exactly_its_tile(
    stride: int, origin: tuple[int, int], mpp: tuple[float, float] | None
) -> None:
    """A raster pixel's world extent equals the tile's level-0 pixel extent on the slide layer.

    The slide layer has scale = mpp, no translate, so level-0 pixel j spans
    [(j - 0.5) * mpp, (j + 0.5) * mpp). Tile (r, c) without overlap covers level-0 pixels
    o + c*S .. o + c*S + S - 1.
    """
    scale, translate = tile_layer_placement(stride_level0=stride, mpp=mpp, origin_level0=origin)
    my, mx = (1.0, 1.0) if mpp is None else (mpp[1], mpp[0])
    for r, c in [(0, 0), (3, 11), (40, 2)]:
        first_x, last_x = origin[0] + c * stride, origin[0] + c * stride + stride - 1
        first_y, last_y = origin[1] + r * stride, origin[1] + r * stride + stride - 1
        want_x = ((first_x - 0.5) * mx, (last_x + 0.5) * mx)
        want_y = ((first_y - 0.5) * my, (last_y + 0.5) * my)
        assert np.allclose(_napari_extent(c, scale[1], translate[1]), want_x)
        assert np.allclose(_napari_extent(r, scale[0], translate[0]), want_y)


def test_placement_values_row_col_order() -> None:
    scale, translate = tile_layer_placement(stride_level0=448, mpp=(0.25, 0.5))
    assert scale.tolist() == [448 * 0.5, 448 * 0.25]
    assert translate.tolist() == [447 / 2 * 0.5, 447 / 2 * 0.25]
    scale, translate = tile_layer_placement(stride_level0=4, mpp=0.5, origin_level0=(10, 20))
    assert translate.tolist() == [(1.5 + 20) * 0.5, (1.5 + 10) * 0.5]
