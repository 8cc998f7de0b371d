"""Where the tiles of an embeddings file lie on the slide: from its attributes, not guesses.

Each tool records its tiling differently (attribute names checked in their sources):

- gpfm (:mod:`gpfm_core.embed.storage`): root ``tile_size_level0``, ``stride_level0`` and a
  ``grid_rc`` dataset; one grid from the slide's corner.
- TRIDENT (``trident/IO.py`` ``coords_to_h5``, copied onto the features file's ``coords``):
  ``patch_size`` (px at the target magnification), ``patch_size_level0``
  (``patch_size * level0_magnification // target_magnification``), ``level0_magnification``,
  ``target_magnification``, ``overlap`` (px at the target magnification), ``level0_width``,
  ``level0_height``. ``WSIPatcher`` steps by ``round(patch_size * ds) - round(overlap * ds)``
  level-0 px from ``(0, 0)``, ``ds = level0_magnification / target_magnification``.
- CLAM (``wsi_core/WholeSlideImage.py`` ``process_contour``, on the patching file's
  ``coords``): ``patch_size`` (px at ``patch_level``), ``patch_level``, ``downsample`` (that
  level's ``(dx, dy)``), ``downsampled_level_dim``, ``level_dim``, ``name``, ``save_path``.
  Each tissue contour's grid starts at the contour's own bounding box, so tiles of different
  contours lie on different lattices; the step (``step_size``) is not recorded. CLAM's
  feature files (``extract_features_fp.py``) carry no attributes at all: the geometry comes
  from the patching file (``coords_file``).

The tile size is the footprint of one tile in level-0 px; the stride the step between
neighbouring tiles of one lattice. Both have an x and a y value: slides with non-square
pixels (µm/px x ≠ y) are tiled with a level-0 box that is not square (gpfm's
``tile_size_level0_y`` / ``stride_level0_y``, TRIDENT-style ``patch_size_level0_y`` beside
``patch_size_level0``; CLAM's ``downsample`` is already ``(dx, dy)``). Positions are the stored ``coords`` themselves, so
``coords`` + ``tile_size_level0`` place every tile exactly. ``grid_rc`` puts each tile in a
cell of one raster of pitch ``stride_level0`` from ``origin``; :attr:`TileGeometry.exact` says
whether that raster places every tile exactly (CLAM files with several contours: no, each tile
is then in its nearest cell, at most ``grid_error_level0`` px off).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TileGeometry", "tile_geometry"]


@dataclass(frozen=True)
class TileGeometry:
    """How the tiles of one file lie on the slide, in level-0 pixels.

    Attributes
    ----------
    tile_size_level0 : int or None
        Width of each tile's footprint; None when it cannot be known.
    stride_level0 : int or None
        Step along x between neighbouring tiles of one lattice; None when unknown.
    origin : (int, int)
        Level-0 ``(x, y)`` of raster cell ``(0, 0)``'s top-left corner.
    grid_shape : (int, int)
        ``(rows, cols)`` of the raster holding every ``grid_rc``.
    exact : bool
        Every tile's corner is ``origin + grid_rc[:, ::-1] * stride_level0_xy``.
    grid_error_level0 : int or None
        Largest distance (per axis) between a tile's corner and its raster cell; 0 when exact.
    source : str
        Where the geometry came from: ``"gpfm"``, ``"trident"``, ``"clam"``, ``"spacing"``
        (measured from the coordinates) or ``"unknown"``.
    note : str or None
        One line when something had to be assumed or is unknown.
    tile_size_level0_y, stride_level0_y : int or None
        The same along y; they differ from the x values only for non-square pixels (None at
        construction means "same as x").
    """

    tile_size_level0: int | None
    stride_level0: int | None
    origin: tuple[int, int]
    grid_shape: tuple[int, int]
    exact: bool
    grid_error_level0: int | None
    source: str
    note: str | None = None
    tile_size_level0_y: int | None = None
    stride_level0_y: int | None = None

    def __post_init__(self) -> None:
        for name in ("tile_size_level0", "stride_level0"):
            if getattr(self, f"{name}_y") is None and getattr(self, name) is not None:
                object.__setattr__(self, f"{name}_y", int(getattr(self, name)))

    @property
    def known(self) -> bool:
        """Whether the tile size is known (tiles can be placed on the slide)."""
        return self.tile_size_level0 is not None

    @property
    def tile_size_level0_xy(self) -> tuple[int, int] | None:
        """Level-0 ``(width, height)`` of a tile, None when unknown."""
        if self.tile_size_level0 is None:
            return None
        return int(self.tile_size_level0), int(self.tile_size_level0_y)  # type: ignore[arg-type]

    @property
    def stride_level0_xy(self) -> tuple[int, int] | None:
        """Level-0 ``(x, y)`` step between neighbouring tiles, None when unknown."""
        if self.stride_level0 is None:
            return None
        return int(self.stride_level0), int(self.stride_level0_y)  # type: ignore[arg-type]


def _num(attrs: Mapping[str, Any], key: str) -> float | None:
    value = attrs.get(key)
    if value is None or isinstance(value, str | bytes):
        return None
    arr = np.asarray(value, dtype=float).ravel()
    if arr.size == 0 or not np.isfinite(arr[0]) or arr[0] <= 0:
        return None
    return float(arr[0])


def measured_stride(coords: np.ndarray) -> int | None:
    """The step between neighbouring tiles, measured from ``coords`` (N, 2); None if no pairs.

    The most common positive gap between consecutive tiles of one row (same y), or of one
    column when no row has two tiles. Robust to several lattices (CLAM's contours), unlike
    the smallest gap between distinct x values, which mixes lattices (212 instead of 512).
    """
    for axis in (0, 1):
        other = 1 - axis
        if coords.shape[0] < 2:
            return None
        order = np.lexsort((coords[:, axis], coords[:, other]))
        c = coords[order]
        same_line = c[1:, other] == c[:-1, other]
        gaps = (c[1:, axis] - c[:-1, axis])[same_line]
        gaps = gaps[gaps > 0]
        if gaps.size:
            values, counts = np.unique(gaps, return_counts=True)
            return int(values[np.argmax(counts)])
    return None


Pair = tuple[int, int]


def _xy(x: float | None, y: float | None) -> Pair | None:
    """``(round(x), round(y))`` with y defaulting to x; None without x."""
    if x is None:
        return None
    return round(x), round(y if y is not None else x)


def _from_attrs(attrs: Mapping[str, Any]) -> tuple[Pair | None, Pair | None, str, str | None]:
    """(tile size (x, y), stride (x, y) or None, source, note) from the attributes alone."""
    tile0 = _num(attrs, "tile_size_level0")
    stride0 = _num(attrs, "stride_level0")
    if tile0 is not None:
        return (
            _xy(tile0, _num(attrs, "tile_size_level0_y")),
            _xy(stride0, _num(attrs, "stride_level0_y")),
            "gpfm",
            None,
        )
    patch = _num(attrs, "patch_size")
    size0 = _num(attrs, "patch_size_level0")
    mag0, mag = _num(attrs, "level0_magnification"), _num(attrs, "target_magnification")
    if size0 is not None or (patch is not None and mag0 and mag):
        # TRIDENT reads round(patch * mag0 / mag) level-0 px and records the floor of it;
        # a writer whose magnifications are rounded labels (gpfm's) records the true size
        by_mag = bool(patch and mag0 and mag) and (
            size0 is None or int(patch * mag0 // mag) == round(size0)  # type: ignore[operator]
        )
        ratio = mag0 / mag if by_mag else (size0 / patch if patch else None)  # type: ignore[operator]
        tile = round(patch * ratio) if by_mag else round(size0)  # type: ignore[arg-type,operator]
        overlap = _num(attrs, "overlap") or 0.0
        over0 = round(overlap * ratio) if ratio else 0
        # TRIDENT assumes square pixels; gpfm writes the height of non-square ones beside it
        tile_y = _num(attrs, "patch_size_level0_y")
        size = (tile, round(tile_y) if tile_y is not None else tile)
        return size, (max(size[0] - over0, 1), max(size[1] - over0, 1)), "trident", None
    if patch is not None and "patch_level" in attrs:
        level = int(np.asarray(attrs["patch_level"]).ravel()[0])
        ds = attrs.get("downsample")
        dxy = None
        if ds is not None and not isinstance(ds, str | bytes):
            arr = np.asarray(ds, dtype=float).ravel()
            if arr.size and np.isfinite(arr).all() and (arr > 0).all():
                dxy = (float(arr[0]), float(arr[-1]))  # CLAM records the level's (dx, dy)
        if dxy is None and level == 0:
            dxy = (1.0, 1.0)
        if dxy is None:
            return (
                None,
                None,
                "clam",
                f"CLAM file at patch_level {level} without its 'downsample' attribute",
            )
        return (round(patch * dxy[0]), round(patch * dxy[1])), None, "clam", None
    return None, None, "unknown", None


def tile_geometry(
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    grid_rc: np.ndarray | None = None,
    *,
    name: str = "file",
) -> tuple[TileGeometry, np.ndarray]:
    """The tile geometry of a file and each tile's raster cell.

    Parameters
    ----------
    coords
        (N, 2) int64 level-0 top-left ``(x, y)``.
    attrs
        The file's attributes (root over ``coords`` / ``features``; see the module doc).
    grid_rc
        (N, 2) stored ``(row, col)`` (gpfm files), else None.
    name
        The file's name, for the note.

    Returns
    -------
    (TileGeometry, numpy.ndarray)
        The geometry and ``grid_rc`` (N, 2) int64 ``(row, col)``, all >= 0.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = coords.shape[0]
    tile, stride, source, note = _from_attrs(attrs)
    if stride is None:
        measured = measured_stride(coords)
        if measured is not None:
            # one step for both axes: files that record no stride come from tools that
            # assume square pixels (a non-square tile size keeps its own aspect)
            stride = (measured, measured)
            if tile is not None and tile[0] != tile[1]:
                stride = (measured, max(1, round(measured * tile[1] / tile[0])))
            if tile is None:
                tile, source = (measured, measured), "spacing"
                note = (
                    f"{name}: no tile-size attributes; tile size {measured} level-0 px taken "
                    "from the tile spacing (assumes no overlap)" + (f" ({note})" if note else "")
                )
        elif tile is not None:
            stride = tile  # one tile per row and column: nothing to measure, nothing to overlap
    if tile is None or stride is None:
        why = note or "no tile-size attributes and too few tiles to measure their spacing"
        note = (
            f"{name}: tile geometry cannot be known ({why}); the features load but the tiles "
            "cannot be placed on the slide: pass the patching file (coords_file=)"
        )
        rc = _ranks(coords)
        shape = (int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1) if n else (0, 0)
        origin = (int(coords[:, 0].min()), int(coords[:, 1].min())) if n else (0, 0)
        return TileGeometry(None, None, origin, shape, False, None, "unknown", note), rc
    step = np.array(stride, dtype=np.int64)  # (x, y)
    if grid_rc is not None and n:
        rc = np.asarray(grid_rc, dtype=np.int64).reshape(-1, 2)
        offsets = coords - rc[:, ::-1] * step
        origin_arr = offsets[0]
    elif n:
        origin_arr = _origin(coords, step)
        rc = np.rint((coords - origin_arr) / step).astype(np.int64)[:, ::-1]
    else:
        rc, origin_arr = np.zeros((0, 2), np.int64), np.zeros(2, np.int64)
    err = int(np.abs(coords - origin_arr - rc[:, ::-1] * step).max()) if n else 0
    rows = int(attrs.get("grid_rows", 0) or 0) if grid_rc is not None else 0
    cols = int(attrs.get("grid_cols", 0) or 0) if grid_rc is not None else 0
    if n:
        rows = max(rows, int(rc[:, 0].max()) + 1)
        cols = max(cols, int(rc[:, 1].max()) + 1)
    if err and note is None:
        note = (
            f"{name}: tiles lie on several grids (e.g. CLAM's per-contour grids); place them by "
            f"their coords, the one-raster grid_rc is up to {err} level-0 px off"
        )
    geom = TileGeometry(
        int(tile[0]),
        int(stride[0]),
        (int(origin_arr[0]), int(origin_arr[1])),
        (rows, cols),
        err == 0,
        err,
        source,
        note,
        tile_size_level0_y=int(tile[1]),
        stride_level0_y=int(stride[1]),
    )
    return geom, rc


def _origin(coords: np.ndarray, stride: np.ndarray) -> np.ndarray:
    """Raster origin: the lattice of most tiles, moved left/up until no cell index is < 0.

    ``stride`` is the ``(x, y)`` step.
    """
    res = coords % stride
    pairs, counts = np.unique(res, axis=0, return_counts=True)
    anchor = pairs[np.argmax(counts)]
    lo = coords.min(axis=0)
    # nearest cell: a tile maps to round((c - o) / s) >= 0 iff c - o >= -s/2
    shift = np.array(
        [math.ceil(max(0.0, (anchor[i] - lo[i] - stride[i] / 2) / stride[i])) for i in (0, 1)]
    )
    return (anchor - shift * stride).astype(np.int64)


def _ranks(coords: np.ndarray) -> np.ndarray:
    """(row, col) as the rank of each tile's y and x among the distinct values."""
    if coords.shape[0] == 0:
        return np.zeros((0, 2), np.int64)
    cols = np.unique(coords[:, 0], return_inverse=True)[1]
    rows = np.unique(coords[:, 1], return_inverse=True)[1]
    return np.column_stack([rows, cols]).astype(np.int64)
