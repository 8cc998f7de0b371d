"""Annotation layers <-> level-0 geometry, and probe export / import (no Qt).

The annotation layers (a Shapes layer, a Points layer) store level-0 pixel-centre
``(row, col) = (y, x)`` data (``scale = mpp``, no extra translate), with a ``class`` feature
(int index into the class list). GeoJSON (QuPath) uses continuous coordinates where pixel
``x`` spans ``[x, x + 1]``: export adds 0.5, import subtracts it.

True geometry beside the layer
------------------------------
napari Shapes cannot hold a hole or a multi-part region, so an imported QuPath object is
shown as one napari shape per part (its outer ring, a polygon; or a path for a line) and its
true ``shapely`` geometry (holes kept) is stored beside the layer, in
``layer.metadata["gpfm_geometry"]`` (a :class:`GeometryStore`), keyed by the outline shown.
Labelling and export look each shape up there by its current vertices:

* unchanged vertices: the stored geometry is used (holes, parts, the object's name, lock
  and UUID survive labelling and the round trip back to QuPath);
* the whole shape moved (every vertex shifted by one offset): the stored geometry, shifted;
* anything else (a vertex moved, added or removed; a rotated or scaled shape): the shape's
  own outline replaces the stored geometry, as the user drew it.

No row identity is needed, so shapes can be added, deleted, reordered or copied freely.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import GpfmError
from napari_gpfm._widget._session import SlideSession

log = logging.getLogger(__name__)

_ELLIPSE_VERTICES = 48
GEOMETRY_KEY = "gpfm_geometry"
_AREA_TYPES = ("polygon", "rectangle", "ellipse")
_LINE_TYPES = ("path", "line")


@dataclass(frozen=True)
class StoredShape:
    """The true geometry behind one napari shape.

    Attributes
    ----------
    outline
        (K, 2) float64 level-0 (x, y) vertices of the napari shape as the layer holds them.
    geometry
        shapely geometry (level-0 pixel-centre coordinates) this shape stands for: a
        Polygon with its holes, or a LineString.
    group
        The QuPath object the shape belongs to (its UUID): parts of one MultiPolygon share it.
    name, locked
        The QuPath object's name and ``isLocked``.
    """

    outline: np.ndarray
    geometry: Any
    group: str
    name: str = ""
    locked: bool = False


def _tolerance(outline: np.ndarray) -> float:
    # napari keeps shape vertices as float32: allow its rounding at level-0 magnitudes
    return 1e-3 + 4 * float(np.finfo(np.float32).eps) * float(np.abs(outline).max(initial=0.0))


def _perimeter_key(outline: np.ndarray) -> tuple[int, int]:
    d = np.diff(np.vstack([outline, outline[:1]]), axis=0)
    return outline.shape[0], round(float(np.hypot(d[:, 0], d[:, 1]).sum()) * 10)


class GeometryStore:
    """Stored geometries of one Shapes layer, looked up by a shape's vertices."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int], list[StoredShape]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def add(self, entry: StoredShape) -> None:
        """Remember ``entry`` (its outline as the layer holds it)."""
        self._by_key.setdefault(_perimeter_key(entry.outline), []).append(entry)

    def resolve(self, outline: np.ndarray) -> tuple[StoredShape, Any] | None:
        """(entry, geometry) for a shape with these (x, y) vertices, or None (see module doc)."""
        import shapely

        outline = np.asarray(outline, dtype=np.float64)
        if outline.ndim != 2 or outline.shape[0] == 0:
            return None
        n, key = _perimeter_key(outline)
        tol = _tolerance(outline)
        moved = None
        for k in (key, key - 1, key + 1):  # float32 rounding may cross a bucket edge
            for entry in self._by_key.get((n, k), ()):
                shift = outline - entry.outline
                if np.abs(shift).max() <= tol:
                    return entry, entry.geometry
                if moved is None and np.ptp(shift, axis=0).max() <= tol:
                    moved = entry, shapely.transform(entry.geometry, lambda c, s=shift[0]: c + s)
        return moved

    @classmethod
    def of(cls, layer: Any, *, create: bool = False) -> GeometryStore | None:
        """The store of a Shapes layer (made on first use with ``create``), or None."""
        meta = getattr(layer, "metadata", None)
        if meta is None:
            return None
        store = meta.get(GEOMETRY_KEY)
        if not isinstance(store, GeometryStore) and create:
            store = meta[GEOMETRY_KEY] = cls()
        return store if isinstance(store, GeometryStore) else None


@dataclass
class Collected:
    """Annotations in level-0 ``(x, y)`` pixel-centre coordinates.

    Attributes
    ----------
    polygons : list of numpy.ndarray
        (K, 2) float64 outline per usable shape as drawn (ellipses as 48-gons; lines and
        paths as their vertices).
    classes : list of int
        Class index per shape.
    points : numpy.ndarray
        (P, 2) float64 point annotations.
    point_classes : list of int
        Class index per point.
    skipped : int
        Shapes with too few vertices to mean anything.
    geometries : list
        shapely geometry per shape: the stored true geometry (holes, see the module
        docstring), else the outline (a Polygon, or a LineString for a line / path).
    stored : list
        The :class:`StoredShape` behind each shape, or None for a drawn (or edited) one.
    """

    polygons: list[np.ndarray]
    classes: list[int]
    points: np.ndarray
    point_classes: list[int]
    skipped: int = 0
    geometries: list[Any] = field(default_factory=list)
    stored: list[StoredShape | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.geometries and self.polygons:
            from shapely.geometry import Polygon

            self.geometries = [Polygon(p) for p in self.polygons]
        if not self.stored:
            self.stored = [None] * len(self.polygons)

    @property
    def count(self) -> int:
        """Number of usable annotations."""
        return len(self.polygons) + len(self.points)


def _ellipse(corners: np.ndarray) -> np.ndarray:
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    c, r = (lo + hi) / 2, (hi - lo) / 2
    t = np.linspace(0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
    return np.stack([c[0] + r[0] * np.cos(t), c[1] + r[1] * np.sin(t)], axis=1)


def _classes(layer: Any, n: int) -> list[int]:
    feats = getattr(layer, "features", None)
    if feats is None or "class" not in feats or len(feats) != n:
        return [0] * n
    return [int(v) if np.isfinite(v) else 0 for v in np.asarray(feats["class"], dtype=float)]


def collect(shapes: Any | None, points: Any | None) -> Collected:
    """Read the annotation layers into level-0 geometry with class indices."""
    from shapely.geometry import LineString, Polygon

    polys: list[np.ndarray] = []
    classes: list[int] = []
    geoms: list[Any] = []
    stored: list[StoredShape | None] = []
    skipped = 0
    if shapes is not None and len(shapes.data):
        store = GeometryStore.of(shapes)
        cls = _classes(shapes, len(shapes.data))
        for data, kind, c in zip(shapes.data, shapes.shape_type, cls, strict=True):
            xy = np.asarray(data, dtype=np.float64)[:, -2:][:, ::-1]
            area = kind in _AREA_TYPES
            if (area and len(xy) < 3) or (not area and (kind not in _LINE_TYPES or len(xy) < 2)):
                skipped += 1
                continue
            hit = store.resolve(xy) if store is not None and kind != "ellipse" else None
            if hit is not None:
                geom = hit[1]
            elif kind == "ellipse":
                geom = Polygon(_ellipse(xy))
            else:
                geom = Polygon(xy) if area else LineString(xy)
            polys.append(_ellipse(xy) if kind == "ellipse" else xy)
            classes.append(c)
            geoms.append(geom)
            stored.append(None if hit is None else hit[0])
    pts = np.zeros((0, 2))
    pcls: list[int] = []
    if points is not None and len(points.data):
        pts = np.asarray(points.data, dtype=np.float64)[:, -2:][:, ::-1]
        pcls = _classes(points, len(pts))
    return Collected(polys, classes, pts, pcls, skipped, geoms, stored)


@dataclass(frozen=True)
class TileLabels:
    """Per-tile labels of a slide from its annotations.

    Attributes
    ----------
    labels
        (N,) int64 class index per tile, -1 none.
    n_outside
        Annotations that touch no embedded tile.
    groups
        (N,) int64 annotation of each labelled tile (-1 none); the parts of one QuPath
        object are one annotation. For grouped cross-validation.
    """

    labels: np.ndarray
    n_outside: int
    groups: np.ndarray


def label_tiles(session: SlideSession, ann: Collected) -> TileLabels:
    """Label ``session``'s tiles from ``ann`` with the true geometry (holes, lines, points)."""
    from gpfm_core.analysis import labels_for_shapes

    out = labels_for_shapes(
        ann.geometries, ann.classes, session.coords, session.tile_size_xy,
        points=ann.points if len(ann.points) else None,
        point_classes=ann.point_classes if len(ann.points) else None,
    )  # fmt: skip
    # the shapes of one QuPath object (a MultiPolygon's parts) are one annotation
    keys = [s.group if s is not None else f"shape {i}" for i, s in enumerate(ann.stored)]
    keys += [f"point {j}" for j in range(len(ann.points))]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    remap = np.array([index[k] for k in keys] + [-1], dtype=np.int64)
    groups = remap[np.asarray(out.groups)]  # -1 (no annotation) maps to the last entry, -1
    return TileLabels(np.asarray(out.labels), int(out.n_outside), groups)


def tile_labels(session: SlideSession, ann: Collected) -> tuple[np.ndarray, int]:
    """Per-tile class labels (N,) int64 (-1 none) and the number of annotations off the tiles."""
    out = label_tiles(session, ann)
    return out.labels, out.n_outside


def annotations_of(
    ann: Collected, class_names: list[str], colours: list[tuple[int, int, int]]
) -> list[Any]:
    """The annotation layers as QuPath objects (level-0 QuPath coordinates, +0.5 px).

    Parts of one imported QuPath object that still share a class are written as that one
    object again (its name, lock and UUID kept); every other shape is one object; points
    are one MultiPoint object per class, as QuPath's Points tool makes them.
    """
    import shapely
    from shapely.geometry import MultiPoint

    from gpfm_core.analysis import Annotation
    from gpfm_core.analysis.io import assemble_parts

    def cls_name(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else "Unclassified"

    def colour(c: int) -> tuple[int, int, int] | None:
        return tuple(colours[c]) if 0 <= c < len(colours) else None  # type: ignore[return-value]

    def to_qupath(g: Any) -> Any:
        return shapely.transform(g, lambda xy: xy + 0.5)

    grouped: dict[tuple[str, int, int], list[int]] = {}
    order: list[tuple[str, int, int] | int] = []
    for i, (geom, c, entry) in enumerate(zip(ann.geometries, ann.classes, ann.stored, strict=True)):
        if entry is None:
            order.append(i)
            continue
        key = (entry.group, c, int(shapely.get_dimensions(geom)))
        if key not in grouped:
            grouped[key] = []
            order.append(key)
        grouped[key].append(i)
    out = []
    used: set[str] = set()  # a UUID names one object: a split object keeps it once
    for item in order:
        if isinstance(item, int):
            c = ann.classes[item]
            out.append(Annotation(to_qupath(ann.geometries[item]), cls_name(c), colour(c)))
            continue
        idx = grouped[item]
        entry = ann.stored[idx[0]]
        assert entry is not None
        geom = assemble_parts([ann.geometries[i] for i in idx])
        c = item[1]
        uid = entry.group if _is_uuid(entry.group) and entry.group not in used else None
        used.add(entry.group)
        out.append(
            Annotation(to_qupath(geom), cls_name(c), colour(c), "annotation", entry.name,
                       entry.locked, uid)
        )  # fmt: skip
    pcls = np.asarray(ann.point_classes, dtype=np.int64)
    for c in dict.fromkeys(ann.point_classes):
        pts = ann.points[pcls == c] + 0.5
        geom = MultiPoint(pts) if len(pts) > 1 else shapely.points(pts[0])
        out.append(Annotation(geom, cls_name(c), colour(c)))
    return out


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(str(text))
    except ValueError:
        return False
    return True


def export_geojson(
    path: str | os.PathLike[str],
    session: SlideSession,
    ann: Collected,
    class_names: list[str],
    colours: list[tuple[int, int, int]],
    *,
    prediction: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
) -> Path:
    """Annotations (objectType annotation, true geometry) + per-tile predictions (detections)."""
    import json

    from gpfm_core._atomic import write_atomic
    from gpfm_core.analysis import annotations_to_geojson, predictions_to_geojson

    objects = annotations_of(ann, class_names, colours)
    features = list(annotations_to_geojson(objects)["features"]) if objects else []
    if prediction is not None:
        pred = predictions_to_geojson(
            session.coords, session.tile_size_xy, np.asarray(prediction), class_names, colours,
            confidence=confidence,
        )  # fmt: skip
        features += pred["features"]
    if not features:
        raise GpfmError("nothing to export: draw annotations or train the probe first")
    return write_atomic(
        Path(path), json.dumps({"type": "FeatureCollection", "features": features})
    )


def export_csv(
    path: str | os.PathLike[str],
    session: SlideSession,
    class_names: list[str],
    prediction: np.ndarray,
    confidence: np.ndarray,
) -> Path:
    """Per-tile predictions (x, y, width, height, class, confidence) as CSV."""
    from gpfm_core.analysis import predictions_to_csv

    return predictions_to_csv(
        session.coords,
        prediction,
        confidence,
        class_names,
        path=path,
        tile_size_level0=session.tile_size_xy,
    )


@dataclass
class Imported:
    """QuPath annotations ready for the layers (level-0 pixel-centre (x, y)).

    Attributes
    ----------
    shapes
        One ``(shape type, outline (K, 2) (x, y), StoredShape)`` per napari shape:
        ``"polygon"`` for each part of a region, ``"path"`` for each part of a line.
    shape_classes
        Class name per shape.
    points
        (P, 2) point annotations; ``point_classes`` their class names.
    colours
        ``{class name: (r, g, b)}`` from the file.
    message
        One line: what was read and what was left out (detections, features without
        geometry), from :meth:`gpfm_core.analysis.QuPathObjects.message`.
    n_holes
        Holes kept beside the layer (napari does not draw them).
    """

    shapes: list[tuple[str, np.ndarray, StoredShape]]
    shape_classes: list[str]
    points: np.ndarray
    point_classes: list[str]
    colours: dict[str, tuple[int, int, int]]
    message: str
    n_holes: int = 0

    @property
    def polygons(self) -> list[np.ndarray]:
        """The outlines of the shapes."""
        return [s[1] for s in self.shapes]


def _parts(geom: Any) -> Iterable[Any]:
    import shapely

    return [p for p in shapely.get_parts(geom) if not p.is_empty]


def import_geojson(path: str | os.PathLike[str]) -> Imported:
    """Read a QuPath GeoJSON file into napari-ready shapes, points and class colours."""
    import shapely

    from gpfm_core.analysis import read_qupath_geojson

    objs = read_qupath_geojson(path)
    shapes: list[tuple[str, np.ndarray, StoredShape]] = []
    names: list[str] = []
    pts: list[np.ndarray] = []
    pnames: list[str] = []
    colours: dict[str, tuple[int, int, int]] = {}
    holes = 0
    for a in objs.annotations:
        if a.colour is not None:
            colours.setdefault(a.class_name, tuple(int(v) for v in a.colour))  # type: ignore[arg-type]
        geom = shapely.transform(a.geometry, lambda xy: xy - 0.5)  # QuPath -> pixel centres
        group = a.uid or str(uuid.uuid4())
        if a.kind == "points":
            xy = shapely.get_coordinates(geom)
            pts.append(xy)
            pnames += [a.class_name] * len(xy)
            continue
        for part in _parts(geom):
            if part.geom_type == "Polygon":
                outline = np.asarray(part.exterior.coords, dtype=np.float64)[:-1]
                holes += len(part.interiors)
                kind = "polygon"
            else:
                outline = np.asarray(part.coords, dtype=np.float64)
                kind = "path"
            shapes.append((kind, outline, StoredShape(outline, part, group, a.name, a.locked)))
            names.append(a.class_name)
    points = np.concatenate(pts) if pts else np.zeros((0, 2))
    return Imported(shapes, names, points, pnames, colours, objs.message(), holes)


def add_imported(shapes_layer: Any, imported: Imported, classes: list[int]) -> None:
    """Append ``imported``'s shapes (with ``classes``) to a Shapes layer and store their geometry.

    The outlines are stored as the layer holds them (float32), so an untouched shape finds
    its geometry again exactly.
    """
    if not imported.shapes:
        return
    data = [outline[:, ::-1] for _kind, outline, _e in imported.shapes]
    shapes_layer.add(data, shape_type=[kind for kind, _o, _e in imported.shapes])
    n = len(imported.shapes)
    shapes_layer.features.loc[shapes_layer.features.index[-n:], "class"] = classes
    store = GeometryStore.of(shapes_layer, create=True)
    assert store is not None
    held = shapes_layer.data[-n:]
    for (_kind, _o, entry), now in zip(imported.shapes, held, strict=True):
        outline = np.asarray(now, dtype=np.float64)[:, -2:][:, ::-1]
        store.add(StoredShape(outline, entry.geometry, entry.group, entry.name, entry.locked))
