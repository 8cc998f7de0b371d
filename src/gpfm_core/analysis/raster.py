"""Tile values -> raster (one pixel per tile) and its placement on the slide in napari."""

from __future__ import annotations

import numpy as np

from gpfm_core.analysis._util import as_points, positive_int
from gpfm_core.errors import GpfmError


def tiles_to_raster(
    values: np.ndarray,
    grid_rc: np.ndarray,
    grid_shape: tuple[int, int],
    *,
    fill: float | int | None = None,
    dtype: np.dtype | type | str | None = None,
) -> np.ndarray:
    """Scatter per-tile values into a (rows, cols[, C]) raster.

    Parameters
    ----------
    values
        (N,) or (N, C) per-tile values.
    grid_rc
        (N, 2) int64 (row, col) of each tile.
    grid_shape
        (rows, cols) of the full grid.
    fill
        Value where no tile exists; default NaN for float dtypes, 0 otherwise.
    dtype
        Output dtype (default: that of ``values``).

    Returns
    -------
    numpy.ndarray
        (rows, cols) or (rows, cols, C). If two tiles share a cell the later one wins.
    """
    vals = np.asarray(values)
    if vals.ndim not in (1, 2):
        raise GpfmError(f"values must be (N,) or (N, C), got shape {vals.shape}")
    rc = as_points(grid_rc, name="grid_rc", n=vals.shape[0])
    if len(grid_shape) != 2:
        raise GpfmError(f"grid_shape must be (rows, cols), got {grid_shape!r}")
    rows = positive_int(grid_shape[0], name="grid_shape rows")
    cols = positive_int(grid_shape[1], name="grid_shape cols")
    if rc.size and (rc.min() < 0 or rc[:, 0].max() >= rows or rc[:, 1].max() >= cols):
        raise GpfmError(
            f"grid_rc lies outside grid_shape {grid_shape}: pass the grid of this slide"
        )
    out_dtype = np.dtype(dtype) if dtype is not None else vals.dtype
    if fill is None:
        fill = np.nan if np.issubdtype(out_dtype, np.floating) else 0
    elif isinstance(fill, float) and np.isnan(fill) and not np.issubdtype(out_dtype, np.floating):
        raise GpfmError(
            f"fill=NaN needs a float dtype, got {out_dtype}: pass fill=0 or dtype=float32"
        )
    shape = (rows, cols) if vals.ndim == 1 else (rows, cols, vals.shape[1])
    out = np.full(shape, fill, dtype=out_dtype)
    out[rc[:, 0], rc[:, 1]] = vals
    return out


def _positive_pair(value: object, *, name: str) -> tuple[float, float]:
    """``(x, y)`` positive finite floats from one number (both axes) or a pair."""
    arr = np.asarray(value, dtype=np.float64).ravel() if value is not None else np.zeros(0)
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not (np.isfinite(arr).all() and (arr > 0).all()):
        raise GpfmError(f"{name} must be positive, got {value!r}: set the slide's µm/px")
    return float(arr[0]), float(arr[1])


def tile_layer_placement(
    *,
    stride_level0: float | tuple[float, float],
    mpp: tuple[float, float] | float | None = None,
    origin_level0: tuple[float, float] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """napari ``scale`` and ``translate`` for a raster with one pixel per tile.

    The one placement formula of the project (``napari_gpfm._layers.tile_layer_transform``
    and the dock's overlays call it). napari centres pixel i on coordinate i (it spans
    [i - 0.5, i + 0.5)). Tile column c of a grid starting at level-0 offset o with stride S
    covers level-0 pixels o + c*S .. o + c*S + S - 1, i.e. [o + c*S - 0.5, o + c*S + S - 0.5)
    in pixel-centre coordinates; the raster pixel must therefore be centred at
    o + c*S + (S - 1)/2 and span S, per axis:

    ``scale = S * mpp``, ``translate = ((S - 1) / 2 + o) * mpp``.

    This assumes the slide image itself is shown with ``scale = mpp`` and no translate.
    With overlapping tiles (tile size T > S) pass ``origin_level0 = o + (T - S)/2`` to centre
    each pixel on its tile's centre. Non-square pixels (µm/px x ≠ y) have a stride per axis
    (:attr:`gpfm_core.tiling.TileGrid.stride_level0_xy`).

    Parameters
    ----------
    stride_level0
        Tile stride S in level-0 pixels: one number, or ``(Sx, Sy)``. Any positive number
        (a tissue mask's downsample places its pixels the same way).
    mpp
        (x, y) µm per level-0 pixel (a float for both), or None for level-0 pixel units.
    origin_level0
        (x, y) level-0 offset of the first tile's top-left corner.

    Returns
    -------
    tuple of numpy.ndarray
        scale (2,) and translate (2,) float64 in napari (row, col) = (y, x) order.

    Raises
    ------
    GpfmError
        A stride or µm/px that is not a positive finite number.
    """
    try:
        sx, sy = _positive_pair(stride_level0, name="stride_level0")
    except GpfmError:
        raise GpfmError(f"stride_level0 must be positive, got {stride_level0!r}") from None
    mx, my = (1.0, 1.0) if mpp is None else _positive_pair(mpp, name="mpp")
    ox, oy = (float(v) for v in origin_level0)
    scale = np.array([sy * my, sx * mx], dtype=np.float64)
    translate = np.array([((sy - 1) / 2 + oy) * my, ((sx - 1) / 2 + ox) * mx], dtype=np.float64)
    return scale, translate
