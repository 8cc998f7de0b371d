"""QuPath GeoJSON import / export of annotations and tile predictions.

Coordinates are level-0 pixels (x, y), origin at the top-left of the full-resolution image,
in QuPath's continuous convention (pixel ``x`` spans ``[x, x + 1]``). Geometry is kept as
``shapely`` geometry, so holes, multi-part regions, lines and points survive a round trip.

Reading follows QuPath's own reader (qupath-core ``PathObjectTypeAdapters``,
``GsonTools.PathClassTypeAdapter`` and ``ROITypeAdapters``, QuPath 0.2 to 0.6):

* object type: ``properties.objectType`` (0.4+), else ``properties.object_type`` (0.3), else
  ``properties.type``, else the legacy feature ``id`` of 0.2 (``PathAnnotationObject``,
  ``PathDetectionObject``, ``PathCellObject``, ``PathTileObject``, ``TMACoreObject``);
  no type means an annotation, and an unknown one is read as an annotation, as QuPath does;
* classification: ``{"name", "color"}`` (0.4+), ``{"names": [...], "color"}`` (derived
  classes, 0.5+), a plain string (``"Tumor: Positive"``), or the pre-0.4 field form
  ``{"name", "colorRGB", "parentClass": {...}}`` (a derived class names its parent);
  ``null`` or ``{}`` is unclassified;
* colour: the classification's, else the object's ``properties.color`` (packed or RGB);
* geometry: Point, MultiPoint, LineString, MultiLineString, Polygon (with holes),
  MultiPolygon, GeometryCollection (split by dimension); a feature without geometry is
  named in :meth:`QuPathObjects.message`; ``isLocked`` and the object's UUID are kept.

Only annotations are training regions: detections, cells and tiles are returned apart
(:attr:`QuPathObjects.detections`), TMA cores and the root object are counted.
Written features carry QuPath 0.4+ properties (``objectType``, ``classification`` with a
colour, which QuPath requires, ``isLocked``, ``measurements`` as a map).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core._atomic import write_atomic
from gpfm_core.analysis._util import as_points, size_xy
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

Colour = tuple[int, int, int]
UNCLASSIFIED = "Unclassified"
#: QuPath's colour for a class that has none (``PathClass.DEFAULT_COLOR``).
DEFAULT_CLASS_COLOUR: Colour = (64, 64, 64)
#: Object types that are never training regions.
DETECTION_TYPES = ("detection", "cell", "tile")
_LEGACY_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
_TYPES = {
    "annotation": "annotation",
    "detection": "detection",
    "cell": "cell",
    "tile": "tile",
    "tmacore": "tmaCore",
    "tma_core": "tmaCore",
    "root": "root",
}
_TYPE_WORDS = {"cell": "cell", "detection": "detection", "tile": "tile", "tmaCore": "TMA core"}


def geometry_kind(geometry: Any) -> str:
    """``"region"`` (polygons), ``"line"``, ``"points"``, ``"mixed"`` or ``"empty"``."""
    import shapely

    if geometry is None or geometry.is_empty:
        return "empty"
    dims = {int(d) for d in shapely.get_dimensions(shapely.get_parts(geometry))}
    if len(dims) != 1:
        return "mixed"
    return {0: "points", 1: "line", 2: "region"}[dims.pop()]


@dataclass(frozen=True)
class Annotation:
    """One QuPath object read from (or written to) GeoJSON.

    Attributes
    ----------
    geometry
        ``shapely`` geometry in level-0 QuPath coordinates (pixel x spans [x, x+1]):
        Polygon / MultiPolygon (holes kept), LineString / MultiLineString, Point / MultiPoint.
    class_name
        QuPath class name, derived classes joined by ``": "`` (``"Tumor: Positive"``);
        ``"Unclassified"`` when the object has none.
    colour
        (r, g, b) 0-255, or None.
    object_type
        ``"annotation"``, ``"detection"``, ``"cell"``, ``"tile"``, ``"tmaCore"`` or ``"root"``.
    name
        The object's name, or "".
    locked
        QuPath's ``isLocked``.
    uid
        The object's UUID (QuPath 0.4+ feature ``id``), kept for a round trip; or None.
    """

    geometry: Any
    class_name: str = UNCLASSIFIED
    colour: Colour | None = None
    object_type: str = "annotation"
    name: str = ""
    locked: bool = False
    uid: str | None = None

    @property
    def kind(self) -> str:
        """:func:`geometry_kind` of the geometry."""
        return geometry_kind(self.geometry)


@dataclass(frozen=True)
class QuPathObjects:
    """What :func:`read_qupath_geojson` found.

    Attributes
    ----------
    annotations
        Annotation objects (the training regions, lines and points), in file order.
    detections
        Detection, cell and tile objects: counted, never training regions.
    unread
        One description per feature that gives nothing to use: no geometry (named), a TMA
        core, the root object.
    notes
        Other things worth saying (unknown object types read as annotations, repaired
        self-intersecting polygons).
    source
        The file's name.
    """

    annotations: list[Annotation] = field(default_factory=list)
    detections: list[Annotation] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = ""

    def message(self) -> str:
        """One line for the user: what was read and what was left out, and why."""
        parts = [f"{len(self.annotations)} annotation(s) read from {self.source}"]
        if self.detections:
            counts = Counter(a.object_type for a in self.detections)
            what = ", ".join(f"{n} {_TYPE_WORDS.get(t, t)}(s)" for t, n in sorted(counts.items()))
            parts.append(f"{what} left out (QuPath detections are not training regions)")
        if self.unread:
            parts.append("not read: " + ", ".join(self.unread))
        parts.extend(self.notes)
        return "; ".join(parts)


def to_rgb255(colour: Sequence[float] | str | None) -> Colour | None:
    """(r, g, b) 0-255 from 0-255 ints, 0-1 floats (napari RGBA), or '#rrggbb'."""
    if colour is None:
        return None
    if isinstance(colour, str):
        h = colour.lstrip("#")
        if len(h) not in (6, 8):
            raise GpfmError(f"colour {colour!r} is not '#rrggbb': pick a colour again")
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    raw = list(colour)[:3]
    if len(raw) != 3:
        raise GpfmError(f"colour {colour!r} needs 3 components (r, g, b)")
    vals = [float(v) for v in raw]
    # floats all within [0, 1] are napari-style unit colours; anything else is 0-255
    is_unit = all(isinstance(v, (float, np.floating)) for v in raw) and max(vals) <= 1.0
    rgb = [round(v * 255) if is_unit else round(v) for v in vals]
    return tuple(int(min(max(v, 0), 255)) for v in rgb)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- writing
def _num(v: float) -> float | int:
    f = float(v)
    return int(f) if f.is_integer() else round(f, 3)


def _ring(points: np.ndarray) -> list[list[float]]:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 3 or not np.isfinite(pts).all():
        raise GpfmError(f"polygon must be a finite (K, 2) array with K >= 3, got shape {pts.shape}")
    ring = [[_num(x), _num(y)] for x, y in pts]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def _classification(name: str, colour: Colour | None) -> dict:
    # QuPath's reader needs a colour beside the name (GsonTools.PathClassTypeAdapter)
    return {"name": name, "color": list(colour if colour is not None else DEFAULT_CLASS_COLOUR)}


def _feature(geometry: dict, props: dict) -> dict:
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def _json_coords(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_json_coords(v) for v in obj]
    return _num(obj)


def geometry_to_geojson(geometry: Any) -> dict:
    """A shapely geometry as a GeoJSON geometry dict (closed rings, 3 decimals)."""
    from shapely.geometry import mapping

    if geometry.geom_type == "GeometryCollection":
        return {
            "type": "GeometryCollection",
            "geometries": [geometry_to_geojson(g) for g in geometry.geoms],
        }
    m = mapping(geometry)
    return {"type": m["type"], "coordinates": _json_coords(m["coordinates"])}


def _dump(collection: dict, path: str | os.PathLike[str] | None) -> dict:
    if path is not None:
        write_atomic(path, json.dumps(collection, separators=(",", ":")))
    return collection


def annotations_to_geojson(
    annotations: Iterable[Annotation], *, path: str | os.PathLike[str] | None = None
) -> dict:
    """QuPath objects as a GeoJSON FeatureCollection QuPath reads back as they were.

    Parameters
    ----------
    annotations
        Objects with shapely geometry in level-0 QuPath coordinates; holes, parts, lines
        and points are written as they are.
    path
        Write the GeoJSON here (atomically) when given.

    Returns
    -------
    dict
        The FeatureCollection: one Feature per object (its ``uid`` as the feature id, or a
        new UUID), ``properties`` with ``objectType``, ``name``, ``classification``
        (``{"name", "color"}``; when unclassified, the colour as the object's ``color``)
        and ``isLocked`` when locked.
    """
    import shapely

    features = []
    for a in annotations:
        if a.geometry is None or a.geometry.is_empty:
            raise GpfmError(f"annotation {a.name or a.class_name!r} has no geometry: redraw it")
        if not np.isfinite(shapely.get_coordinates(a.geometry)).all():
            raise GpfmError(
                f"annotation {a.name or a.class_name!r} has NaN or infinite coordinates: redraw it"
            )
        props: dict[str, Any] = {"objectType": a.object_type}
        if a.name:
            props["name"] = a.name
        if a.class_name and a.class_name != UNCLASSIFIED:
            props["classification"] = _classification(a.class_name, a.colour)
        elif a.colour is not None:
            props["color"] = list(a.colour)  # the object's own colour
        if a.locked:
            props["isLocked"] = True
        feature = _feature(geometry_to_geojson(a.geometry), props)
        if a.uid:
            feature["id"] = a.uid
        features.append(feature)
    return _dump({"type": "FeatureCollection", "features": features}, path)


def shapes_to_geojson(
    polygons: Sequence[Any],
    class_names: Sequence[str],
    class_colours: Mapping[str, Sequence[float] | str]
    | Sequence[Sequence[float] | str | None]
    | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    holes: Sequence[Sequence[np.ndarray]] | None = None,
    object_type: str = "annotation",
) -> dict:
    """Annotations as a QuPath-readable GeoJSON FeatureCollection.

    Parameters
    ----------
    polygons
        Exterior rings, each (K, 2) level-0 (x, y), K >= 3 (closed on write), or shapely
        geometries of any type (written as they are, holes and parts included).
    class_names
        One class name per polygon.
    class_colours
        ``{class name: colour}`` or one colour per polygon; colours as 0-255 ints,
        0-1 floats or '#rrggbb'.
    path
        Write the GeoJSON here (atomically) when given.
    holes
        Optional interior rings per (array) polygon.
    object_type
        QuPath objectType, "annotation" by default.

    Returns
    -------
    dict
        The FeatureCollection.
    """
    from shapely.geometry import Polygon

    if len(class_names) != len(polygons):
        raise GpfmError(
            f"{len(polygons)} polygons but {len(class_names)} class names: give one per polygon"
        )
    if holes is not None and len(holes) != len(polygons):
        raise GpfmError("holes must have one list of rings per polygon")
    anns = []
    for i, (poly, name) in enumerate(zip(polygons, class_names, strict=True)):
        if isinstance(class_colours, Mapping):
            colour = to_rgb255(class_colours.get(name))
        elif class_colours is not None:
            colour = to_rgb255(class_colours[i])
        else:
            colour = None
        if hasattr(poly, "geom_type"):
            geom = poly
        else:
            rings = [_ring(poly)] + [_ring(h) for h in (holes[i] if holes is not None else [])]
            geom = Polygon(rings[0], rings[1:])
        anns.append(Annotation(geom, str(name), colour, object_type))
    return annotations_to_geojson(anns, path=path)


def predictions_to_geojson(
    coords: np.ndarray,
    tile_size_level0: int | tuple[int, int],
    labels: np.ndarray,
    class_names: Sequence[str],
    colours: Sequence[Sequence[float] | str | None] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    confidence: np.ndarray | None = None,
    merge: bool = False,
    stride_level0: int | tuple[int, int] | None = None,
    object_type: str = "detection",
) -> dict:
    """Tile predictions as GeoJSON: one square per tile, or merged regions per class.

    Parameters
    ----------
    coords
        (N, 2) int64 level-0 (x, y) top-left corners.
    tile_size_level0
        Tile side T in level-0 pixels (squares span [x, x+T) x [y, y+T)), or its
        ``(width, height)`` (non-square pixels: a tile's level-0 box is not square, see
        :attr:`gpfm_core.tiling.TileGrid.tile_size_level0_xy`).
    labels
        (N,) int class index per tile; negative = not exported.
    class_names
        Name per class index.
    colours
        One colour per class (0-255, 0-1 floats or '#rrggbb'), or None.
    path
        Write the GeoJSON here (atomically) when given.
    confidence
        (N,) float per tile, written as ``measurements.confidence`` (tiles only).
    merge
        One feature per class whose geometry is the union of its tiles (a Polygon or a
        MultiPolygon with holes) instead of one square per tile. With overlapping tiles each
        tile contributes its central stride cell.
    stride_level0
        Tile stride S for ``merge`` (default T); one number or ``(Sx, Sy)``.
    object_type
        "detection" (default, light in QuPath), "tile" or "annotation" (merged regions are
        usually wanted as "annotation").

    Returns
    -------
    dict
        The FeatureCollection.
    """
    xy = as_points(coords, name="coords")
    t = np.array(size_xy(tile_size_level0, name="tile_size_level0"))
    lab = np.asarray(labels).astype(np.int64, copy=False)
    if lab.shape != (xy.shape[0],):
        raise GpfmError(f"labels must have shape ({xy.shape[0]},), got {lab.shape}")
    if lab.size and lab.max() >= len(class_names):
        raise GpfmError(f"labels go up to {lab.max()} but there are {len(class_names)} class names")
    if colours is not None and len(colours) != len(class_names):
        raise GpfmError("colours must have one entry per class name")
    conf = None
    if confidence is not None:
        conf = np.asarray(confidence, dtype=np.float64)
        if conf.shape != lab.shape:
            raise GpfmError("confidence must have one value per tile")
    rgb = [to_rgb255(c) for c in colours] if colours is not None else [None] * len(class_names)
    features: list[dict] = []
    if merge:
        import shapely

        s = np.array(size_xy(t if stride_level0 is None else stride_level0, name="stride_level0"))
        offset = (t - s) / 2.0
        base = xy.min(axis=0) if xy.size else np.zeros(2, np.int64)
        if ((xy - base) % s).any():
            raise GpfmError("tile coords are not on a grid of the given stride: pass stride_level0")
        cells = (xy - base) // s
        for c, name in enumerate(class_names):
            sel = lab == c
            if not sel.any():
                continue
            # one stride cell per tile; cells only share edges, so their exact union is a
            # coverage union (holes kept; cells touching at a corner stay separate parts)
            lo = np.unique(cells[sel], axis=0) * s + base + offset
            region = shapely.coverage_union_all(
                shapely.box(lo[:, 0], lo[:, 1], lo[:, 0] + s[0], lo[:, 1] + s[1])
            )
            region = shapely.simplify(region, 0)  # drop the vertices left mid-edge
            props = {
                "objectType": object_type,
                "classification": _classification(str(name), rgb[c]),
                "measurements": {"tiles": int(sel.sum())},
            }
            features.append(_feature(geometry_to_geojson(region), props))
    else:
        for i in np.flatnonzero(lab >= 0):
            x, y = int(xy[i, 0]), int(xy[i, 1])
            w, h = int(t[0]), int(t[1])
            c = int(lab[i])
            ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
            props = {
                "objectType": object_type,
                "classification": _classification(str(class_names[c]), rgb[c]),
            }
            if conf is not None and np.isfinite(conf[i]):  # JSON has no NaN
                props["measurements"] = {"confidence": round(float(conf[i]), 6)}
            features.append(_feature({"type": "Polygon", "coordinates": [ring]}, props))
    return _dump({"type": "FeatureCollection", "features": features}, path)




# ---------------------------------------------------------------------------------- reading
def _colour(value: Any) -> Colour | None:
    """A QuPath colour: packed (A)RGB int, or [r, g, b(, a)] 0-255; anything else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        v = int(value) & 0xFFFFFF
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    if isinstance(value, (list, tuple)) and len(value) in (3, 4):
        try:
            return tuple(int(min(max(round(float(c)), 0), 255)) for c in value[:3])  # type: ignore[return-value]
        except (TypeError, ValueError):
            return None
    return None


def _split_names(text: str) -> list[str]:
    # PathClass.fromString: derived classes are separated by ':'
    return [n.strip() for n in str(text).split(":") if n.strip()]


def _class_names(cls: Any, depth: int = 0) -> list[str]:
    if isinstance(cls, str):
        return _split_names(cls)
    if not isinstance(cls, Mapping) or depth > 32:
        return []
    names = cls.get("names")
    if isinstance(names, list) and names:
        own = [n for v in names for n in _split_names(str(v))]
    elif cls.get("name") is not None:
        own = _split_names(str(cls["name"]))
    else:
        own = []
    # before 0.4 a derived class was written field by field: its parent as "parentClass"
    return _class_names(cls.get("parentClass"), depth + 1) + own


def _classification_of(props: Mapping) -> tuple[str, Colour | None]:
    cls = props.get("classification")
    names = _class_names(cls)
    colour = None
    if isinstance(cls, Mapping):
        colour = _colour(cls.get("color")) or _colour(cls.get("colorRGB"))
    if colour is None:
        colour = _colour(props.get("color"))
    return (": ".join(names) if names else UNCLASSIFIED), colour


def _object_type(feat: Mapping, props: Mapping) -> tuple[str, str | None]:
    """(normalised object type, the raw type when it was not recognised)."""
    raw = None
    fid = feat.get("id")
    if isinstance(fid, str) and fid in _LEGACY_IDS:  # QuPath 0.2 kept the type in "id"
        raw = fid
    for key in ("objectType", "object_type", "type"):
        value = props.get(key)
        if isinstance(value, str) and value:
            raw = value
            break
    if raw is None:
        return "annotation", None
    norm = _LEGACY_IDS.get(raw) or _TYPES.get(raw.lower())
    return (norm, None) if norm else ("annotation", raw)


def _label(index: int, props: Mapping) -> str:
    name = props.get("name")
    return f"{name!r}" if isinstance(name, str) and name else f"feature #{index + 1}"


def _parse_geometry(geom: Mapping, where: str, *, repair: bool = True) -> tuple[Any, bool]:
    """(shapely geometry, 2-D, repaired; or None when empty) and whether it was repaired.

    ``repair=False`` skips the validity check (detections: counted, never labelled; a
    QuPath export can hold hundreds of thousands of cells).
    """
    import shapely
    from shapely.geometry import shape

    try:
        with warnings.catch_warnings():  # NaN coordinates: reported below, in one line
            warnings.simplefilter("ignore", RuntimeWarning)
            g = shape(geom)
    except Exception as exc:  # shapely / GEOS raise several types for malformed input
        raise GpfmError(
            f"{where} has a malformed {geom.get('type')!r} geometry ({exc}): export it from QuPath again"
        ) from None
    g = shapely.force_2d(g)
    if g.is_empty:
        return None, False
    coords = shapely.get_coordinates(g)
    if not np.isfinite(coords).all():
        raise GpfmError(f"{where} has NaN or infinite coordinates: export it from QuPath again")
    repaired = False
    polys = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    if repair and polys and not g.is_valid:
        g = _repair(g)
        repaired = True
    return g, repaired


def _repair(g: Any) -> Any:
    """Self-intersecting polygons made valid (shapely.make_valid); other parts kept."""
    import shapely

    out = []
    for part in shapely.get_parts(g):
        if part.geom_type in ("Polygon", "MultiPolygon") and not part.is_valid:
            fixed = shapely.make_valid(part)
            out.extend(p for p in shapely.get_parts(fixed) if p.geom_type == "Polygon")
        else:
            out.append(part)
    return assemble_parts(out)


def assemble_parts(parts: list[Any]) -> Any:
    """One shapely geometry from parts: a single part as itself, parts of one kind as a
    MultiPolygon / MultiLineString / MultiPoint, mixed kinds as a GeometryCollection."""
    from shapely.geometry import GeometryCollection, MultiLineString, MultiPoint, MultiPolygon

    if len(parts) == 1:
        return parts[0]
    kinds = {p.geom_type.replace("Multi", "") for p in parts}
    flat = [q for p in parts for q in (p.geoms if p.geom_type.startswith("Multi") else [p])]
    if kinds == {"Polygon"}:
        return MultiPolygon(flat)
    if kinds == {"LineString"}:
        return MultiLineString(flat)
    if kinds == {"Point"}:
        return MultiPoint(flat)
    return GeometryCollection(parts)


def _by_dimension(g: Any) -> list[Any]:
    """A geometry split into at most three: its regions, its lines, its points."""
    import shapely

    if g.geom_type != "GeometryCollection":
        return [g]
    parts = [p for p in shapely.get_parts(g) if not p.is_empty]
    while any(p.geom_type == "GeometryCollection" for p in parts):
        parts = [q for p in parts for q in shapely.get_parts(p) if not q.is_empty]
    groups: dict[int, list[Any]] = {}
    for p in parts:
        groups.setdefault(int(shapely.get_dimensions(p)), []).append(p)
    return [assemble_parts(groups[d]) for d in (2, 1, 0) if d in groups]


def read_qupath_geojson(path: str | os.PathLike[str]) -> QuPathObjects:
    """Read the objects of a QuPath (or plain) GeoJSON file, as QuPath itself reads them.

    Accepts a FeatureCollection, a single Feature, a list of Features (QuPath's default
    export before 0.4) or bare geometries. Every dialect listed in the module docstring is
    read; a GeometryCollection mixing regions, lines and points gives one object per kind.

    Parameters
    ----------
    path
        The ``.geojson`` / ``.json`` file.

    Returns
    -------
    QuPathObjects
        ``annotations`` (training regions, lines, points), ``detections`` (detections,
        cells, tiles), ``unread`` (features without geometry, TMA cores, root) and a
        one-line :meth:`~QuPathObjects.message`.

    Raises
    ------
    GpfmError
        Not JSON, not GeoJSON, or a malformed geometry (the feature is named).
    """
    p = Path(path)
    if not p.is_file():
        raise GpfmError(f"{p} not found: choose a .geojson file exported from QuPath")
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GpfmError(
            f"{p} is not GeoJSON (not valid JSON): export it from QuPath as GeoJSON"
        ) from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features")
    elif isinstance(data, dict) and "type" in data:
        items = [data]
    elif isinstance(data, list):
        items = data
    else:
        items = None
    if not isinstance(items, list) or not all(isinstance(f, dict) for f in items):
        raise GpfmError(
            f"{p} is not GeoJSON (no Feature or FeatureCollection): export it from QuPath"
        )
    out = QuPathObjects(source=p.name)
    unknown: Counter[str] = Counter()
    repaired = 0
    geometry_types = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
                      "MultiPolygon", "GeometryCollection")  # fmt: skip
    for i, feat in enumerate(items):
        if feat.get("type") == "Feature":
            geom, props = feat.get("geometry"), feat.get("properties") or {}
        elif feat.get("type") in geometry_types:
            geom, props = feat, {}
        else:
            raise GpfmError(
                f"{p} holds a {feat.get('type')!r} object, not a GeoJSON Feature: export it from QuPath"
            )
        if not isinstance(props, Mapping):
            props = {}
        otype, raw = _object_type(feat, props)
        if raw is not None:
            unknown[raw] += 1
        label = _label(i, props)
        if otype in ("tmaCore", "root"):
            out.unread.append(f"{label} ({'TMA core' if otype == 'tmaCore' else 'root object'})")
            continue
        g, fixed = (None, False)
        if isinstance(geom, Mapping) and geom.get("type") is not None:
            g, fixed = _parse_geometry(
                geom, f"{p.name}: {label}", repair=otype not in DETECTION_TYPES
            )
        if g is None:
            out.unread.append(f"{label} (no geometry)")
            continue
        repaired += fixed
        name, colour = _classification_of(props)
        fid = feat.get("id")
        uid = fid if isinstance(fid, str) and fid not in _LEGACY_IDS else None
        name_prop = props.get("name")
        for part in _by_dimension(g):
            ann = Annotation(
                geometry=part,
                class_name=name,
                colour=colour,
                object_type=otype,
                name=str(name_prop) if isinstance(name_prop, str) else "",
                locked=props.get("isLocked") is True,
                uid=uid,
            )
            (out.detections if otype in DETECTION_TYPES else out.annotations).append(ann)
    for raw, n in unknown.items():
        out.notes.append(f"{n} object(s) of unknown type {raw!r} read as annotations")
    if repaired:
        out.notes.append(f"{repaired} self-intersecting polygon(s) repaired")
    log.info("%s", out.message())
    return out
