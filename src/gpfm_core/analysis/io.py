"""QuPath-compatible GeoJSON import / export of annotations and tile predictions.

Coordinates are level-0 pixels (x, y), origin at the top-left of the full-resolution image,
as QuPath writes them. Features carry QuPath >= 0.3 properties:
``{"objectType": "annotation" | "detection" | "tile", "classification": {"name", "color"}}``
and, for predictions, ``"measurements": {"confidence": ...}`` (QuPath >= 0.4 map form).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpfm_core._atomic import write_atomic
from gpfm_core.analysis._util import as_points, positive_int
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

Colour = tuple[int, int, int]
UNCLASSIFIED = "Unclassified"


@dataclass(frozen=True)
class Annotation:
    """One polygon read from GeoJSON.

    Attributes
    ----------
    polygon
        (K, 2) float64 level-0 (x, y) exterior ring, not closed (last != first).
    holes
        Interior rings, each (K, 2), not closed.
    class_name
        QuPath class name ("Unclassified" when the feature has none).
    colour
        (r, g, b) 0-255, or None.
    object_type
        QuPath objectType ("annotation" when missing).
    name
        The feature's name property, or "".
    """

    polygon: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    class_name: str = UNCLASSIFIED
    colour: Colour | None = None
    object_type: str = "annotation"
    name: str = ""


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


def _ring(points: np.ndarray) -> list[list[float]]:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 3 or not np.isfinite(pts).all():
        raise GpfmError(f"polygon must be a finite (K, 2) array with K >= 3, got shape {pts.shape}")
    ring = [[_num(x), _num(y)] for x, y in pts]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def _num(v: float) -> float | int:
    f = float(v)
    return int(f) if f.is_integer() else round(f, 3)


def _classification(name: str, colour: Colour | None) -> dict:
    out: dict = {"name": name}
    if colour is not None:
        out["color"] = list(colour)
    return out


def _feature(rings: list[list[list[float]]], props: dict, *, multi: bool = False) -> dict:
    geom = {"type": "MultiPolygon" if multi else "Polygon", "coordinates": rings}
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geom, "properties": props}


def _dump(collection: dict, path: str | os.PathLike[str] | None) -> dict:
    if path is not None:
        write_atomic(path, json.dumps(collection, separators=(",", ":")))
    return collection


def shapes_to_geojson(
    polygons: Sequence[np.ndarray],
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
        Exterior rings, each (K, 2) level-0 (x, y), K >= 3 (closed on write).
    class_names
        One class name per polygon.
    class_colours
        ``{class name: colour}`` or one colour per polygon; colours as 0-255 ints,
        0-1 floats or '#rrggbb'.
    path
        Write the GeoJSON here (atomically) when given.
    holes
        Optional interior rings per polygon.
    object_type
        QuPath objectType, "annotation" by default.

    Returns
    -------
    dict
        The FeatureCollection.
    """
    if len(class_names) != len(polygons):
        raise GpfmError(
            f"{len(polygons)} polygons but {len(class_names)} class names: give one per polygon"
        )
    if holes is not None and len(holes) != len(polygons):
        raise GpfmError("holes must have one list of rings per polygon")
    features = []
    for i, (poly, name) in enumerate(zip(polygons, class_names, strict=True)):
        if isinstance(class_colours, Mapping):
            colour = to_rgb255(class_colours.get(name))
        elif class_colours is not None:
            colour = to_rgb255(class_colours[i])
        else:
            colour = None
        rings = [_ring(poly)] + [_ring(h) for h in (holes[i] if holes is not None else [])]
        props = {"objectType": object_type, "classification": _classification(str(name), colour)}
        features.append(_feature(rings, props))
    return _dump({"type": "FeatureCollection", "features": features}, path)


def predictions_to_geojson(
    coords: np.ndarray,
    tile_size_level0: int,
    labels: np.ndarray,
    class_names: Sequence[str],
    colours: Sequence[Sequence[float] | str | None] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    confidence: np.ndarray | None = None,
    merge: bool = False,
    stride_level0: int | None = None,
    object_type: str = "detection",
) -> dict:
    """Tile predictions as GeoJSON: one square per tile, or merged regions per class.

    Parameters
    ----------
    coords
        (N, 2) int64 level-0 (x, y) top-left corners.
    tile_size_level0
        Tile side T in level-0 pixels (squares span [x, x+T) x [y, y+T)).
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
        Tile stride S for ``merge`` (default T).
    object_type
        "detection" (default, light in QuPath), "tile" or "annotation" (merged regions are
        usually wanted as "annotation").

    Returns
    -------
    dict
        The FeatureCollection.
    """
    xy = as_points(coords, name="coords")
    t = positive_int(tile_size_level0, name="tile_size_level0")
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
        from gpfm_core.analysis._outline import cell_outlines

        s = positive_int(stride_level0 if stride_level0 is not None else t, name="stride_level0")
        offset = (t - s) / 2.0
        base = xy.min(axis=0) if xy.size else np.zeros(2, np.int64)
        if ((xy - base) % s).any():
            raise GpfmError("tile coords are not on a grid of the given stride: pass stride_level0")
        cells = (xy - base) // s
        for c, name in enumerate(class_names):
            sel = lab == c
            if not sel.any():
                continue
            polys = []
            for ext, hs in cell_outlines(cells[sel]):
                polys.append([_ring(r * s + base + offset) for r in [ext, *hs]])
            props = {
                "objectType": object_type,
                "classification": _classification(str(name), rgb[c]),
            }
            props["measurements"] = {"tiles": int(sel.sum())}
            if len(polys) == 1:
                features.append(_feature(polys[0], props))
            else:
                features.append(_feature(polys, props, multi=True))
    else:
        for i in np.flatnonzero(lab >= 0):
            x, y = int(xy[i, 0]), int(xy[i, 1])
            c = int(lab[i])
            ring = [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]
            props = {
                "objectType": object_type,
                "classification": _classification(str(class_names[c]), rgb[c]),
            }
            if conf is not None:
                props["measurements"] = {"confidence": round(float(conf[i]), 6)}
            features.append(_feature([ring], props))
    return _dump({"type": "FeatureCollection", "features": features}, path)


def _parse_colour(cls: Mapping) -> Colour | None:
    if "color" in cls and cls["color"] is not None:
        return to_rgb255([int(v) for v in cls["color"]][:3])
    if "colorRGB" in cls and cls["colorRGB"] is not None:  # QuPath 0.2: packed (A)RGB int
        v = int(cls["colorRGB"]) & 0xFFFFFF
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    return None


def _open_ring(ring: object) -> np.ndarray:
    arr = np.asarray(ring, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise GpfmError("a polygon ring is not a list of [x, y] positions: check the GeoJSON")
    arr = arr[:, :2]
    if arr.shape[0] > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    return arr


def read_qupath_geojson(path: str | os.PathLike[str]) -> list[Annotation]:
    """Read polygons from a QuPath (or plain) GeoJSON file.

    Accepts a FeatureCollection, a single Feature, a list of Features (QuPath's default
    export) or bare geometries; Polygon and MultiPolygon (one Annotation per part).
    Other geometry types (points, lines) are skipped with a warning.

    Returns
    -------
    list of Annotation
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
    out: list[Annotation] = []
    skipped = 0
    for feat in items:
        if feat.get("type") == "Feature":
            geom, props = feat.get("geometry") or {}, feat.get("properties") or {}
        elif feat.get("type") in ("Polygon", "MultiPolygon"):
            geom, props = feat, {}
        else:
            raise GpfmError(
                f"{p} holds a {feat.get('type')!r} object, not a GeoJSON Feature: export it from QuPath"
            )
        cls = props.get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else None
        if not name and isinstance(cls, dict) and cls.get("names"):
            name = ": ".join(str(n) for n in cls["names"])
        colour = _parse_colour(cls) if isinstance(cls, dict) else None
        if colour is None and props.get("color") is not None:
            colour = to_rgb255([int(v) for v in props["color"]][:3])
        gtype, coords = geom.get("type"), geom.get("coordinates")
        if gtype == "Polygon":
            parts = [coords]
        elif gtype == "MultiPolygon":
            parts = coords
        else:
            skipped += 1
            continue
        for rings in parts or []:
            if not rings:
                continue
            out.append(
                Annotation(
                    polygon=_open_ring(rings[0]),
                    holes=[_open_ring(r) for r in rings[1:]],
                    class_name=str(name) if name else UNCLASSIFIED,
                    colour=colour,
                    object_type=str(props.get("objectType", "annotation")),
                    name=str(props.get("name", "")),
                )
            )
    if skipped:
        warnings.warn(f"{skipped} non-polygon GeoJSON features skipped", stacklevel=2)
    log.info("read %d polygons from %s", len(out), p)
    return out
