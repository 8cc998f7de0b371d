"""Annotation layers <-> level-0 geometry, and probe export / import (no Qt).

The annotation layers (``gpfm: annotations`` Shapes, ``gpfm: annotation points`` Points)
store level-0 pixel-centre ``(row, col) = (y, x)`` data (``scale = mpp``, no extra
translate), with a ``class`` feature (int index into the class list). GeoJSON (QuPath)
uses continuous coordinates where pixel ``x`` spans ``[x, x + 1]``: export adds 0.5,
import subtracts it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core._atomic import write_atomic
from gpfm_core.errors import GpfmError
from napari_gpfm._widget._session import SlideSession

log = logging.getLogger(__name__)

_ELLIPSE_VERTICES = 48


@dataclass
class Collected:
    """Annotations in level-0 ``(x, y)`` pixel-centre coordinates.

    Attributes
    ----------
    polygons : list of numpy.ndarray
        (K, 2) float64 vertices per shape (ellipses as 48-gons).
    classes : list of int
        Class index per polygon.
    points : numpy.ndarray
        (P, 2) float64 point annotations.
    point_classes : list of int
        Class index per point.
    skipped : int
        Shapes that are not areas (lines, paths).
    """

    polygons: list[np.ndarray]
    classes: list[int]
    points: np.ndarray
    point_classes: list[int]
    skipped: int = 0

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
    polys: list[np.ndarray] = []
    classes: list[int] = []
    skipped = 0
    if shapes is not None and len(shapes.data):
        cls = _classes(shapes, len(shapes.data))
        for data, kind, c in zip(shapes.data, shapes.shape_type, cls, strict=True):
            xy = np.asarray(data, dtype=np.float64)[:, -2:][:, ::-1]
            if kind == "ellipse":
                xy = _ellipse(xy)
            elif kind not in ("polygon", "rectangle") or len(xy) < 3:
                skipped += 1
                continue
            polys.append(xy)
            classes.append(c)
    pts = np.zeros((0, 2))
    pcls: list[int] = []
    if points is not None and len(points.data):
        pts = np.asarray(points.data, dtype=np.float64)[:, -2:][:, ::-1]
        pcls = _classes(points, len(pts))
    return Collected(polys, classes, pts, pcls, skipped)


def tile_labels(session: SlideSession, ann: Collected) -> tuple[np.ndarray, int]:
    """Per-tile class labels (N,) int64 (-1 none) and the number of annotations off the tiles."""
    from gpfm_core.analysis import labels_for_shapes

    out = labels_for_shapes(
        ann.polygons, ann.classes, session.coords, session.tile_size,
        points=ann.points if len(ann.points) else None,
        point_classes=ann.point_classes if len(ann.points) else None,
    )  # fmt: skip
    return np.asarray(out.labels), int(out.n_outside)


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
    """Annotations (objectType annotation) + per-tile predictions (detections) as QuPath GeoJSON."""
    import json

    from gpfm_core.analysis import predictions_to_geojson, shapes_to_geojson

    names = [class_names[c] if 0 <= c < len(class_names) else "Unclassified" for c in ann.classes]
    by_name = dict(zip(class_names, colours, strict=False))
    polys = [p + 0.5 for p in ann.polygons]
    features = list(shapes_to_geojson(polys, names, by_name)["features"]) if polys else []
    if prediction is not None:
        pred = predictions_to_geojson(
            session.coords, session.tile_size, np.asarray(prediction), class_names, colours,
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
        tile_size_level0=session.tile_size,
    )


def import_geojson(
    path: str | os.PathLike[str],
) -> tuple[list[np.ndarray], list[str], dict[str, tuple[int, int, int]]]:
    """Polygons (level-0 pixel-centre (x, y)), their class names and class colours."""
    from gpfm_core.analysis import read_qupath_geojson

    anns = [
        a for a in read_qupath_geojson(path) if a.object_type == "annotation"
    ]  # not tiles/cells
    colours: dict[str, tuple[int, int, int]] = {}
    for a in anns:
        if a.colour is not None:
            colours.setdefault(a.class_name, tuple(int(v) for v in a.colour))  # type: ignore[arg-type]
    return [np.asarray(a.polygon, float) - 0.5 for a in anns], [a.class_name for a in anns], colours
