"""Tile grids at a physical resolution (µm/px), filtered by tissue.

A grid of ``tile_px`` × ``tile_px`` tiles at ``mpp`` µm/px covers
``tile_size_level0 = round(tile_px * mpp / slide_mpp_x)`` level-0 pixels per tile along x
(``tile_size_level0_y`` with ``slide_mpp_y`` along y), placed every
``stride_level0 = tile_size_level0 - overlap_level0`` pixels from the slide's origin,
entirely inside the slide. Each tile is read from ``read_level``, the coarsest trusted
level at or finer than the requested resolution on both axes (its measured factor, see
:func:`gpfm_core.slide.measure_levels`), as ``read_size`` × ``read_size_y`` pixels, and
resampled to ``tile_px`` × ``tile_px`` when they differ.

Non-square pixels (µm/px x ≠ y, as some scanners write) are tiled with the true x and y
µm/px: every tile covers the same square of tissue, ``tile_px * mpp`` µm on a side, so the
level-0 size and stride differ in x and y (``*_y`` fields). For square pixels the ``*_y``
fields equal the scalar ones.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from gpfm_core.errors import GpfmError, SlideError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from gpfm_core.slide import Slide
    from gpfm_core.tissue import TissueMask

__all__ = [
    "TileGrid",
    "check_grid_args",
    "check_tissue_options",
    "make_tile_grid",
    "read_plan",
    "read_tile",
    "read_tiles",
]

log = logging.getLogger(__name__)


class NoTissueWarning(UserWarning):
    """A slide gave no tile with enough tissue (an empty tile grid, or an empty feature file)."""


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide at one resolution (see the module docstring for the geometry).

    Attributes
    ----------
    coords : numpy.ndarray
        ``(N, 2)`` int64 level-0 ``(x, y)`` top-left corners, row-major order.
    grid_rc : numpy.ndarray
        ``(N, 2)`` int64 ``(row, col)`` of each tile in the full grid.
    grid_shape : (int, int)
        ``(rows, cols)`` of the full grid (before the tissue filter).
    tissue_fraction : numpy.ndarray
        ``(N,)`` float32 fraction of each tile on tissue (1.0 without a mask).
    requested_mpp, effective_mpp : float
        Asked µm/px and the µm/px (along x) the rounded level-0 tile size gives.
    tile_px, tile_size_level0, stride_level0, overlap_px : int
        Output tile side, its level-0 width, the level-0 step along x, the overlap in
        output px.
    read_level, read_size : int
        Level read from and tile width in pixels of that level.
    level0_size : (int, int)
        Slide ``(width, height)``.
    slide_mpp : (float, float)
        Slide µm per level-0 pixel.
    slide_id : str
        :attr:`SlideInfo.slide_id` of the slide the grid belongs to.
    min_tissue : float
        Tissue-fraction filter used (0 when tissue was not used).
    tile_size_level0_y, stride_level0_y, read_size_y : int
        The same along y; differ from the x values only for non-square pixels (None at
        construction means "same as x").
    ink_fraction : numpy.ndarray
        ``(N,)`` float32 fraction of each tile on marker ink or marking dye
        (:meth:`TissueMask.ink_fractions`; zeros without a detected ink layer). With
        ``exclude_ink`` (the default) ink is not tissue, so kept tiles carry little; with it
        off, this column flags the inked tiles.
    """

    coords: np.ndarray
    grid_rc: np.ndarray
    grid_shape: tuple[int, int]
    tissue_fraction: np.ndarray
    requested_mpp: float
    effective_mpp: float
    tile_px: int
    tile_size_level0: int
    stride_level0: int
    overlap_px: int
    read_level: int
    read_size: int
    level0_size: tuple[int, int]
    slide_mpp: tuple[float, float]
    slide_id: str
    min_tissue: float = 0.0
    tile_size_level0_y: int | None = None
    stride_level0_y: int | None = None
    read_size_y: int | None = None
    # not compared: a grid made without a mask's ink layer equals its twin (zeros)
    ink_fraction: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("tile_size_level0", "stride_level0", "read_size"):
            if getattr(self, f"{name}_y") is None:
                object.__setattr__(self, f"{name}_y", int(getattr(self, name)))
        if self.ink_fraction is None:
            object.__setattr__(self, "ink_fraction", np.zeros(len(self.coords), np.float32))

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def tile_size_level0_xy(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` of a tile."""
        return (int(self.tile_size_level0), int(self.tile_size_level0_y))  # type: ignore[arg-type]

    @property
    def stride_level0_xy(self) -> tuple[int, int]:
        """Level-0 ``(x, y)`` step between neighbouring tiles."""
        return (int(self.stride_level0), int(self.stride_level0_y))  # type: ignore[arg-type]

    @property
    def read_size_xy(self) -> tuple[int, int]:
        """``(width, height)`` of a tile in pixels of :attr:`read_level`."""
        return (int(self.read_size), int(self.read_size_y))  # type: ignore[arg-type]

    @property
    def effective_mpp_xy(self) -> tuple[float, float]:
        """µm/px of the output tiles along ``(x, y)``."""
        (sx, sy), (mx, my) = self.tile_size_level0_xy, self.slide_mpp
        return (sx * mx / self.tile_px, sy * my / self.tile_px)

    def attrs(self) -> dict[str, Any]:
        """Scalars describing the grid, for HDF5 attributes (TRIDENT-style names too)."""
        return {
            "requested_mpp": float(self.requested_mpp),
            "effective_mpp": float(self.effective_mpp),
            "tile_px": int(self.tile_px),
            "tile_size_level0": int(self.tile_size_level0),
            "stride_level0": int(self.stride_level0),
            "overlap_px": int(self.overlap_px),
            "read_level": int(self.read_level),
            "read_size": int(self.read_size),
            "level0_width": int(self.level0_size[0]),
            "level0_height": int(self.level0_size[1]),
            "slide_mpp_x": float(self.slide_mpp[0]),
            "slide_mpp_y": float(self.slide_mpp[1]),
            "slide_id": str(self.slide_id),
            "grid_rows": int(self.grid_shape[0]),
            "grid_cols": int(self.grid_shape[1]),
            "min_tissue": float(self.min_tissue),
            "tile_size_level0_y": int(self.tile_size_level0_xy[1]),
            "stride_level0_y": int(self.stride_level0_xy[1]),
            "read_size_y": int(self.read_size_xy[1]),
            "n_tiles": len(self),
            # TRIDENT / CLAM names (TRIDENT assumes square pixels: its level-0 patch size is
            # the width; the height of a non-square pixel slide's tiles is beside it)
            "patch_size": int(self.tile_px),
            "patch_size_level0": int(self.tile_size_level0),
            "patch_size_level0_y": int(self.tile_size_level0_xy[1]),
        }

    def subset(self, indices: Sequence[int] | np.ndarray) -> TileGrid:
        """A grid holding only the tiles at ``indices`` (same geometry)."""
        idx = _check_indices(self, indices)
        return replace(
            self,
            coords=self.coords[idx],
            grid_rc=self.grid_rc[idx],
            tissue_fraction=self.tissue_fraction[idx],
            ink_fraction=None if self.ink_fraction is None else self.ink_fraction[idx],
        )


def make_tile_grid(
    slide: Slide,
    *,
    mpp: float | None = 0.5,
    tile_px: int = 224,
    overlap_px: int = 0,
    min_tissue: float = 0.25,
    tissue: TissueMask | Literal[False] | None = None,
    tissue_options: Mapping[str, Any] | None = None,
) -> TileGrid:
    """Lay a tile grid over a slide at ``mpp`` µm/px and keep the tiles on tissue.

    Parameters
    ----------
    slide
        An open slide with µm/px (metadata or override); non-square pixels are tiled
        with their true x and y µm/px (see the module docstring).
    mpp
        Output µm/px; None means the slide's own resolution (along x).
    tile_px
        Output tile side in pixels.
    overlap_px
        Overlap between neighbouring tiles, output pixels (``0 <= overlap < tile_px``).
    min_tissue
        Keep tiles whose tissue fraction is ``>= min_tissue`` (ignored when
        ``tissue=False``).
    tissue
        None: run :func:`~gpfm_core.tissue.detect_tissue`; a :class:`TissueMask` (e.g.
        edited by the user); False: keep every tile.
    tissue_options
        Keyword arguments of :func:`~gpfm_core.tissue.detect_tissue` when ``tissue`` is
        None (e.g. ``{"exclude_ink": False, "modality": "brightfield"}``).

    Returns
    -------
    TileGrid
        Possibly empty (a warning says why); ``ink_fraction`` per tile from the mask's ink
        layer.
    """
    slide_mpp = slide.mpp  # raises SlideError naming the override
    w0, h0 = slide.dimensions
    req = float(slide_mpp[0] if mpp is None else mpp)
    check_grid_args(mpp=req, tile_px=tile_px, overlap_px=overlap_px, min_tissue=min_tissue)
    tile_px, overlap_px = int(tile_px), int(overlap_px)
    # each axis with its own µm/px, so a tile is tile_px * req µm on both sides
    sx, sy = (max(1, round(tile_px * req / m)) for m in slide_mpp)
    ox, oy = (round(overlap_px * req / m) for m in slide_mpp)
    stx, sty = sx - ox, sy - oy
    if min(stx, sty) < 1:
        raise GpfmError(f"overlap_px={overlap_px} leaves no stride; use a smaller overlap")
    if req < max(slide_mpp) * 0.99:
        warnings.warn(
            f"{req:g} µm/px is finer than {slide.path.name}'s {max(slide_mpp):g} µm/px; "
            "tiles will be upsampled",
            stacklevel=2,
        )
    level, (rx, ry) = read_plan(slide, (sx, sy), tile_px)
    cols = (w0 - sx) // stx + 1 if w0 >= sx else 0
    rows = (h0 - sy) // sty + 1 if h0 >= sy else 0
    rr, cc = np.meshgrid(
        np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij"
    )
    grid_rc = np.column_stack([rr.ravel(), cc.ravel()])
    coords = grid_rc[:, ::-1] * np.array([stx, sty], np.int64)
    if tissue is False:
        frac = np.ones(len(coords), np.float32)
        ink = np.zeros(len(coords), np.float32)
        min_tissue = 0.0
    else:
        if tissue is None:
            from gpfm_core.tissue import detect_tissue

            tissue = detect_tissue(slide, **check_tissue_options(tissue_options))
        if tuple(tissue.level0_size) != (w0, h0):
            raise SlideError(
                f"the tissue mask covers {tissue.level0_size} px but {slide.path.name} is "
                f"{w0}x{h0}; make the mask from this slide"
            )
        frac = _box_fractions(tissue, coords, (sx, sy))
        keep = frac >= min_tissue if min_tissue > 0 else np.ones(len(frac), bool)
        coords, grid_rc, frac = coords[keep], grid_rc[keep], frac[keep]
        ink = _box_fractions(tissue, coords, (sx, sy), ink=True)
    if len(coords) == 0:
        why = (
            "the slide is smaller than one tile"
            if rows * cols == 0
            else "no tile has enough tissue"
        )
        warnings.warn(
            f"{slide.path.name}: 0 tiles at {req:g} µm/px, {tile_px} px ({why}); "
            "lower min_tissue, edit the tissue mask or pass tissue=False",
            NoTissueWarning,
            stacklevel=2,
        )
    log.info("%s: %d of %d tiles kept", slide.path.name, len(coords), rows * cols)
    return TileGrid(
        coords=np.ascontiguousarray(coords, np.int64).reshape(-1, 2),
        grid_rc=np.ascontiguousarray(grid_rc, np.int64).reshape(-1, 2),
        grid_shape=(int(rows), int(cols)),
        tissue_fraction=np.asarray(frac, np.float32),
        requested_mpp=req,
        effective_mpp=sx * slide_mpp[0] / tile_px,
        tile_px=tile_px,
        tile_size_level0=int(sx),
        stride_level0=int(stx),
        overlap_px=overlap_px,
        read_level=int(level),
        read_size=rx,
        level0_size=(int(w0), int(h0)),
        slide_mpp=(float(slide_mpp[0]), float(slide_mpp[1])),
        slide_id=slide.slide_id,
        min_tissue=float(min_tissue),
        tile_size_level0_y=int(sy),
        stride_level0_y=int(sty),
        read_size_y=ry,
        ink_fraction=np.asarray(ink, np.float32),
    )


def check_tissue_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as keyword arguments of :func:`~gpfm_core.tissue.detect_tissue`.

    Raises
    ------
    GpfmError
        A name :func:`~gpfm_core.tissue.detect_tissue` does not take.
    """
    import inspect

    from gpfm_core.tissue import detect_tissue

    opts = dict(options or {})
    known = set(inspect.signature(detect_tissue).parameters) - {"slide"}
    bad = sorted(set(opts) - known)
    if bad:
        raise GpfmError(
            f"unknown tissue option(s) {', '.join(bad)}: use {', '.join(sorted(known))}"
        )
    return opts


def _box_fractions(
    tissue: TissueMask, coords: np.ndarray, size: tuple[int, int], *, ink: bool = False
) -> np.ndarray:
    """Tissue (or, with ``ink``, marker-ink) fraction of ``size = (w, h)`` level-0 boxes.

    ``TissueMask.box_fractions`` takes square boxes; a ``w x h`` box is a square one in
    a level-0 frame whose y axis is stretched by ``w / h`` (same mask, ``dy * w / h``).
    """
    w, h = size
    if w != h:
        k = w / h
        tissue = replace(tissue, downsample=(tissue.downsample[0], tissue.downsample[1] * k))
        coords = np.asarray(coords, np.float64).reshape(-1, 2) * np.array([1.0, k])
    return tissue.ink_fractions(coords, w) if ink else tissue.box_fractions(coords, w)


def check_grid_args(*, mpp: float | None, tile_px: int, overlap_px: int, min_tissue: float) -> None:
    """Raise :class:`GpfmError` for grid arguments that cannot work (before slow work)."""
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise GpfmError(f"mpp={mpp!r} must be a positive number of µm per pixel, e.g. 0.5")
    if int(tile_px) != tile_px or tile_px < 1:
        raise GpfmError(f"tile_px={tile_px!r} must be a positive integer, e.g. 224")
    if int(overlap_px) != overlap_px or not 0 <= overlap_px < tile_px:
        raise GpfmError(f"overlap_px={overlap_px!r} must be an integer in [0, tile_px={tile_px})")
    if not 0.0 <= min_tissue <= 1.0:
        raise GpfmError(f"min_tissue={min_tissue!r} must lie in [0, 1]")


def read_tiles(
    slide: Slide, grid: TileGrid, indices: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Read tiles of ``grid`` from ``slide`` in the order of ``indices``.

    Parameters
    ----------
    slide
        The slide the grid was made for.
    grid
        The tile grid.
    indices
        ``(B,)`` tile indices into ``grid``; None reads every tile.

    Returns
    -------
    numpy.ndarray
        ``(B, tile_px, tile_px, 3)`` uint8 RGB; resampled with antialiased bicubic
        when the read size (:attr:`TileGrid.read_size_xy`) is not ``tile_px`` square.
    """
    idx = _check_indices(grid, np.arange(len(grid)) if indices is None else indices)
    out = np.empty((len(idx), grid.tile_px, grid.tile_px, 3), np.uint8)
    for k, i in enumerate(idx):
        out[k] = read_one_tile(slide, grid, int(i))
    return out


def read_one_tile(slide: Slide, grid: TileGrid, index: int) -> np.ndarray:
    """One tile -> ``(tile_px, tile_px, 3)`` uint8."""
    x, y = grid.coords[index]
    return read_tile(slide, (int(x), int(y)), grid.read_level, grid.read_size_xy, grid.tile_px)


def read_plan(
    slide: Slide, size_level0: tuple[int, int], tile_px: int
) -> tuple[int, tuple[int, int]]:
    """Where to read a tile of ``size_level0`` = (w, h) level-0 px shown at ``tile_px``.

    Returns
    -------
    (int, (int, int))
        The coarsest trusted level not coarser than the tile's scale on either axis, and
        the tile's ``(width, height)`` in that level's pixels.
    """
    sx, sy = (int(v) for v in size_level0)
    level = slide.best_level_for_downsample(min(sx, sy) / tile_px)
    ds = slide.level_downsamples[level]
    return level, (max(1, round(sx / ds)), max(1, round(sy / ds)))


def read_tile(
    slide: Slide,
    location: tuple[int, int],
    level: int,
    read_size: tuple[int, int],
    tile_px: int,
) -> np.ndarray:
    """Read ``read_size`` px of ``level`` at level-0 ``location``, as ``(tile_px, tile_px, 3)``
    uint8 (antialiased bicubic when the read size differs)."""
    region = slide.read_region(location, level, read_size)
    if tuple(read_size) == (tile_px, tile_px):
        return region
    from PIL import Image

    img = Image.fromarray(region).resize((tile_px, tile_px), Image.Resampling.BICUBIC)
    return np.array(img)  # a writable copy (torch.from_numpy warns on read-only arrays)


def __getattr__(name: str) -> Any:
    """``TileBatchReader`` lives in :mod:`gpfm_core.reader`; re-exported here lazily."""
    if name == "TileBatchReader":
        from gpfm_core.reader import TileBatchReader

        return TileBatchReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_indices(grid: TileGrid, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise GpfmError(f"tile indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    n = len(grid)
    if idx.min() < -n or idx.max() >= n:
        raise GpfmError(f"tile index out of range for a grid of {n} tiles")
    return idx.astype(np.int64) % max(n, 1)
