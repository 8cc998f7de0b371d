"""Turn drawn annotations (polygons, rectangles, points) into per-tile class labels.

All shapes are in level-0 (x, y) pixels. napari Shapes / Points data are (row, col) = (y, x)
in world units: divide by µm/px and swap the columns before calling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpfm_core.analysis._util import as_points, positive_int
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeLabels:
    """Per-tile labels from annotations.

    Attributes
    ----------
    labels
        (N,) int64 class index per tile, -1 unlabelled.
    n_outside
        Annotations (shapes or points) that touch no embedded tile (their tiles were not
        embedded, e.g. background, or they lie off the slide).
    """

    labels: np.ndarray
    n_outside: int


def _points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(M,) bool: which (M, 2) points lie inside a (K, 2) polygon (even-odd rule)."""
    try:
        from skimage.measure import points_in_poly

        return np.asarray(points_in_poly(points, polygon), dtype=bool)
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        x, y = points[:, 0][:, None], points[:, 1][:, None]
        x0, y0 = polygon[:, 0][None, :], polygon[:, 1][None, :]
        x1, y1 = np.roll(polygon[:, 0], -1)[None, :], np.roll(polygon[:, 1], -1)[None, :]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        return (crosses & (x < xi)).sum(axis=1) % 2 == 1


def _tile_containing(points: np.ndarray, coords: np.ndarray, t: int) -> np.ndarray:
    """(P,) index of the tile holding each level-0 point (nearest centre wins), -1 if none."""
    out = np.full(points.shape[0], -1, dtype=np.int64)
    if coords.shape[0] == 0:
        return out
    centres = coords.astype(np.float64) + t / 2.0
    for i, (x, y) in enumerate(points + 0.5):  # pixel-centre -> pixel-edge coordinates
        inside = (
            (coords[:, 0] <= x)
            & (x < coords[:, 0] + t)
            & (coords[:, 1] <= y)
            & (y < coords[:, 1] + t)
        )
        hits = np.flatnonzero(inside)
        if hits.size:
            d2 = ((centres[hits] - (x, y)) ** 2).sum(axis=1)
            out[i] = hits[int(np.argmin(d2))]
    return out


def labels_for_shapes(
    shapes: Sequence[np.ndarray],
    shape_classes: Sequence[int],
    coords: np.ndarray,
    tile_size_level0: int,
    *,
    points: np.ndarray | None = None,
    point_classes: Sequence[int] | None = None,
) -> ShapeLabels:
    """Label tiles from annotations; later-drawn shapes win where shapes overlap.

    A tile takes a polygon's class when the tile's centre lies inside the polygon. A point
    labels the tile containing it. Points are applied after all polygons (a point is the more
    specific annotation).

    Parameters
    ----------
    shapes
        Polygons / rectangles, each a (K, 2) level-0 (x, y) vertex array, K >= 3, in drawing
        order.
    shape_classes
        One class index (>= 0) per shape.
    coords
        (N, 2) int64 level-0 (x, y) top-left corners of the embedded tiles.
    tile_size_level0
        Tile side in level-0 pixels.
    points
        Optional (P, 2) level-0 (x, y) point annotations.
    point_classes
        One class index per point.

    Returns
    -------
    ShapeLabels
        labels (N,) int64 (-1 unlabelled) and the count of annotations touching no tile.
    """
    xy = as_points(coords, name="coords")
    t = positive_int(tile_size_level0, name="tile_size_level0")
    if len(shapes) != len(shape_classes):
        raise GpfmError(
            f"{len(shapes)} shapes but {len(shape_classes)} classes: give one class per shape"
        )
    labels = np.full(xy.shape[0], -1, dtype=np.int64)
    centres = xy.astype(np.float64) + (t - 1) / 2.0  # pixel-centre coordinates of tile centres
    n_outside = 0
    for i, (poly, cls) in enumerate(zip(shapes, shape_classes, strict=True)):
        verts = np.asarray(poly, dtype=np.float64)
        if verts.ndim != 2 or verts.shape[1] != 2 or verts.shape[0] < 3:
            raise GpfmError(
                f"shape {i} must be a (K, 2) polygon with K >= 3 vertices, got {verts.shape}"
            )
        if not np.isfinite(verts).all():
            raise GpfmError(f"shape {i} has NaN or inf vertices: redraw it")
        if int(cls) < 0:
            raise GpfmError(f"shape {i} has class {cls}: class indices must be >= 0")
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        near = np.flatnonzero(
            (centres[:, 0] >= lo[0])
            & (centres[:, 0] <= hi[0])
            & (centres[:, 1] >= lo[1])
            & (centres[:, 1] <= hi[1])
        )
        inside = near[_points_in_polygon(centres[near], verts)] if near.size else near
        if inside.size == 0:
            n_outside += 1
        labels[inside] = int(cls)
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        pcls = [] if point_classes is None else list(point_classes)
        if len(pcls) != pts.shape[0]:
            raise GpfmError(
                f"{pts.shape[0]} points but {len(pcls)} classes: give one class per point"
            )
        if any(int(c) < 0 for c in pcls):
            raise GpfmError("point class indices must be >= 0")
        hit = _tile_containing(pts, xy, t)
        n_outside += int((hit < 0).sum())
        for tile, cls in zip(hit, pcls, strict=True):
            if tile >= 0:
                labels[tile] = int(cls)
    if n_outside:
        log.info("%d annotations touch no embedded tile", n_outside)
    return ShapeLabels(labels=labels, n_outside=n_outside)
