"""Turn annotations (regions, lines, points) into per-tile class labels.

All shapes are in level-0 (x, y) pixels, in napari's pixel-centre convention (pixel ``j``
spans ``[j - 0.5, j + 0.5)``) unless ``pixel_edges=True`` (QuPath / GeoJSON: pixel ``j``
spans ``[j, j + 1)``). napari Shapes / Points data are (row, col) = (y, x) in world units:
divide by µm/px and swap the columns before calling.

The rules (the same for drawn and imported annotations):

* a region (polygon, rectangle, with holes or in parts) labels the tiles whose centre lies
  in it (on its boundary counts; inside a hole does not);
* a line labels the tiles it passes through (QuPath trains its pixel classifier on the
  pixels under a line annotation in the same way);
* a point labels the tile holding it (the nearest centre among overlapping tiles).

Geometry tests are shapely's (``contains_xy`` / ``intersects``), prepared once per shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpfm_core.analysis._util import as_points, size_xy
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
    groups
        (N,) int64 index of the annotation that gave each tile its label (shapes 0..S-1,
        then points S..S+P-1), -1 unlabelled: the groups of an honest cross-validation.
    """

    labels: np.ndarray
    n_outside: int
    groups: np.ndarray | None = None


def _tile_containing(points: np.ndarray, coords: np.ndarray, t: tuple[int, int]) -> np.ndarray:
    """(P,) index of the tile holding each pixel-edge point (nearest centre wins), -1 if none.

    ``t`` is the tile's level-0 ``(width, height)``.
    """
    out = np.full(points.shape[0], -1, dtype=np.int64)
    if coords.shape[0] == 0:
        return out
    tw, th = t
    centres = coords.astype(np.float64) + np.array([tw, th]) / 2.0
    for i, (x, y) in enumerate(points):
        inside = (
            (coords[:, 0] <= x)
            & (x < coords[:, 0] + tw)
            & (coords[:, 1] <= y)
            & (y < coords[:, 1] + th)
        )
        hits = np.flatnonzero(inside)
        if hits.size:
            d2 = ((centres[hits] - (x, y)) ** 2).sum(axis=1)
            out[i] = hits[int(np.argmin(d2))]
    return out


def _as_geometry(shape: Any, i: int) -> Any:
    """A shapely geometry from a (K, 2) vertex array (a polygon) or a shapely geometry."""
    import shapely
    from shapely.geometry import Polygon

    if hasattr(shape, "geom_type"):
        geom = shape
        coords = shapely.get_coordinates(geom)
    else:
        verts = np.asarray(shape, dtype=np.float64)
        if verts.ndim != 2 or verts.shape[1] != 2 or verts.shape[0] < 3:
            raise GpfmError(
                f"shape {i} must be a (K, 2) polygon with K >= 3 vertices, got {verts.shape}"
            )
        coords = verts
        geom = None
    if not np.isfinite(coords).all():
        raise GpfmError(f"shape {i} has NaN or inf vertices: redraw it")
    if geom is None:
        geom = Polygon(coords)
    if not geom.is_valid and any(
        p.geom_type in ("Polygon", "MultiPolygon") for p in shapely.get_parts(geom)
    ):
        # a self-crossing outline: its valid form keeps the even-odd inside (a bow tie's
        # two triangles), as a point-in-polygon test with the even-odd rule would
        geom = shapely.make_valid(geom)
    return geom


def _tiles_hit(geom: Any, edge_xy: np.ndarray, t: tuple[int, int]) -> np.ndarray:
    """Sorted indices of the tiles a geometry labels; ``edge_xy`` tile corners, pixel edges;
    ``t`` the tile's level-0 ``(width, height)``."""
    import shapely

    hits: list[np.ndarray] = []
    tw, th = t
    centres = edge_xy + np.array([tw, th]) / 2.0
    for part in shapely.get_parts(geom):
        if part.is_empty:
            continue
        dim = int(shapely.get_dimensions(part))
        x0, y0, x1, y1 = part.bounds
        if dim == 2:
            near = np.flatnonzero(
                (centres[:, 0] >= x0) & (centres[:, 0] <= x1)
                & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
            )  # fmt: skip
            if near.size:
                shapely.prepare(part)
                hits.append(near[shapely.intersects_xy(part, centres[near, 0], centres[near, 1])])
        elif dim == 1:
            near = np.flatnonzero(
                (edge_xy[:, 0] <= x1) & (edge_xy[:, 0] + tw > x0)
                & (edge_xy[:, 1] <= y1) & (edge_xy[:, 1] + th > y0)
            )  # fmt: skip
            if near.size:
                # half-open tile boxes [x, x + t): a line on a tile edge labels one row
                hx, hy = tw * (1 - 1e-9), th * (1 - 1e-9)
                boxes = shapely.box(
                    edge_xy[near, 0], edge_xy[near, 1], edge_xy[near, 0] + hx, edge_xy[near, 1] + hy
                )
                shapely.prepare(part)
                hits.append(near[shapely.intersects(part, boxes)])
        else:
            pts = shapely.get_coordinates(part)
            idx = _tile_containing(pts, edge_xy, t)
            hits.append(idx[idx >= 0])
    if not hits:
        return np.empty(0, np.int64)
    return np.unique(np.concatenate(hits)).astype(np.int64)


def labels_for_shapes(
    shapes: Sequence[Any],
    shape_classes: Sequence[int],
    coords: np.ndarray,
    tile_size_level0: int | tuple[int, int],
    *,
    points: np.ndarray | None = None,
    point_classes: Sequence[int] | None = None,
    pixel_edges: bool = False,
) -> ShapeLabels:
    """Label tiles from annotations; later shapes win where shapes overlap.

    A region labels the tiles whose centre lies in it (not in its holes), a line the tiles
    it crosses, a point the tile holding it (see the module docstring). The ``points``
    are applied after all shapes (a point is the more specific annotation).

    Parameters
    ----------
    shapes
        In drawing order: (K, 2) level-0 (x, y) polygon vertex arrays (K >= 3), or shapely
        geometries of any type (Polygon with holes, MultiPolygon, LineString, Point, ...,
        GeometryCollection).
    shape_classes
        One class index (>= 0) per shape.
    coords
        (N, 2) int64 level-0 (x, y) top-left corners of the embedded tiles.
    tile_size_level0
        Tile side in level-0 pixels, or its ``(width, height)`` (non-square pixels:
        :attr:`gpfm_core.tiling.TileGrid.tile_size_level0_xy`).
    points
        Optional (P, 2) level-0 (x, y) point annotations.
    point_classes
        One class index per point.
    pixel_edges
        Shapes and points are in QuPath's convention (pixel x spans [x, x+1]) rather than
        napari's pixel centres: the tiles are shifted by half a pixel to match.

    Returns
    -------
    ShapeLabels
        labels (N,) int64 (-1 unlabelled), the count of annotations touching no tile and
        the annotation that labelled each tile.
    """
    xy = as_points(coords, name="coords")
    t = size_xy(tile_size_level0, name="tile_size_level0")
    if len(shapes) != len(shape_classes):
        raise GpfmError(
            f"{len(shapes)} shapes but {len(shape_classes)} classes: give one class per shape"
        )
    labels = np.full(xy.shape[0], -1, dtype=np.int64)
    groups = np.full(xy.shape[0], -1, dtype=np.int64)
    # tile i covers [x, x + t) in pixel edges, i.e. [x - 0.5, x + t - 0.5) in pixel centres
    edge_xy = xy.astype(np.float64) - (0.0 if pixel_edges else 0.5)
    n_outside = 0
    for i, (shape, cls) in enumerate(zip(shapes, shape_classes, strict=True)):
        if int(cls) < 0:
            raise GpfmError(f"shape {i} has class {cls}: class indices must be >= 0")
        inside = _tiles_hit(_as_geometry(shape, i), edge_xy, t)
        if inside.size == 0:
            n_outside += 1
        labels[inside] = int(cls)
        groups[inside] = i
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        pcls = [] if point_classes is None else list(point_classes)
        if len(pcls) != pts.shape[0]:
            raise GpfmError(
                f"{pts.shape[0]} points but {len(pcls)} classes: give one class per point"
            )
        if any(int(c) < 0 for c in pcls):
            raise GpfmError("point class indices must be >= 0")
        if not np.isfinite(pts).all():
            raise GpfmError("points have NaN or inf coordinates: place them again")
        hit = _tile_containing(pts + (0.0 if pixel_edges else 0.5), xy, t)
        n_outside += int((hit < 0).sum())
        for j, (tile, cls) in enumerate(zip(hit, pcls, strict=True)):
            if tile >= 0:
                labels[tile] = int(cls)
                groups[tile] = len(shapes) + j
    if n_outside:
        log.info("%d annotations touch no embedded tile", n_outside)
    return ShapeLabels(labels=labels, n_outside=n_outside, groups=groups)
