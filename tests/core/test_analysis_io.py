"""QuPath GeoJSON / CSV export and import, and merged tile outlines.

The reader is checked on a case table of files written here, one per QuPath dialect (0.2's
legacy ``id``, 0.3's ``object_type``, 0.4+ ``objectType``; classifications as objects,
``names`` lists, plain strings and 0.2's ``parentClass`` fields) and per geometry type, each
with the exact tiles its annotations label on a 10 x 10 grid of 100 px tiles (tile index
``10 * row + col``; QuPath coordinates, so tile centres lie at 50, 150, ...).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from gpfm_core.analysis import (
    annotations_to_geojson,
    labels_for_shapes,
    predictions_to_csv,
    predictions_to_geojson,
    read_qupath_geojson,
    shapes_to_geojson,
)
from gpfm_core.analysis.io import to_rgb255
from gpfm_core.errors import GpfmError

NAMES = ["Tumor", "Stroma"]


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


T = 100
GRID = np.stack(np.meshgrid(np.arange(10) * T, np.arange(10) * T), axis=-1).reshape(-1, 2)  # (x, y)
UUID = "5a3c4f2e-9b1d-4c8e-8f00-123456789abc"


def _sq(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """A closed ring, as QuPath writes it."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _cells(r0: int, r1: int, c0: int, c1: int) -> list[int]:
    """Tile indices of rows r0..r1 and columns c0..c1 (inclusive)."""
    return [10 * r + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def _feat(geometry: dict | None, **props: object) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _poly(*rings: list) -> dict:
    return {"type": "Polygon", "coordinates": list(rings)}


TUMOR_POS = {"name": "Positive", "colorRGB": -3670016, "parentClass": {"name": "Tumor", "colorRGB": -65536}}

# (id, GeoJSON document, [(class, kind, tiles)] of the annotations in file order,
#  {object type: count} of the detections, substrings of the "not read" list)
CASES = [
    (
        "0.4-polygon-with-hole",  # an erased hole: its 16 tiles keep no label
        {"type": "FeatureCollection", "features": [
            {**_feat(_poly(_sq(0, 0, 1000, 1000), _sq(300, 300, 700, 700)), objectType="annotation",
                     classification={"name": "Tumor", "color": [200, 0, 0]}), "id": UUID},
        ]},
        [("Tumor", "region", sorted(set(range(100)) - set(_cells(3, 6, 3, 6))))],
        {}, [],
    ),
    (
        "0.5-multipolygon-derived-names",  # a part with a hole, and a second part
        [_feat({"type": "MultiPolygon", "coordinates": [
            [_sq(0, 0, 500, 500), _sq(100, 100, 300, 300)], [_sq(700, 700, 1000, 1000)]]},
            objectType="annotation", classification={"names": ["Tumor", "Positive"], "color": [1, 2, 3]})],
        [("Tumor: Positive", "region",
          sorted(set(_cells(0, 4, 0, 4)) - set(_cells(1, 2, 1, 2)) | set(_cells(7, 9, 7, 9))))],
        {}, [],
    ),
    (
        "0.3-object_type-string-class-and-cells",  # a cell detection is not a region
        [_feat(_poly(_sq(0, 900, 300, 1000)), object_type="annotation", classification="Stroma"),
         _feat(_poly(_sq(400, 400, 420, 420)), object_type="cell", classification="Negative"),
         _feat(_poly(_sq(500, 400, 520, 420)), object_type="detection")],
        [("Stroma", "region", [90, 91, 92])],
        {"cell": 1, "detection": 1}, [],
    ),
    (
        "0.2-legacy-id-parentClass",  # the type in "id", a derived class field by field
        [{**_feat(_poly(_sq(800, 0, 1000, 200)), classification=TUMOR_POS), "id": "PathAnnotationObject"},
         {**_feat(_poly(_sq(10, 10, 30, 30)), classification={"name": "Negative", "colorRGB": -16776961}),
          "id": "PathCellObject"},
         {**_feat(_poly(_sq(0, 0, 1000, 1000)), classification={"name": "Image"}), "id": "PathTileObject"}],
        [("Tumor: Positive", "region", [8, 9, 18, 19])],
        {"cell": 1, "tile": 1}, [],
    ),
    (
        "linestring",  # the tiles a line crosses
        [_feat({"type": "LineString", "coordinates": [[50, 450], [350, 450]]},
               objectType="annotation", classification={"name": "Margin", "color": [0, 0, 255]})],
        [("Margin", "line", [40, 41, 42, 43])],
        {}, [],
    ),
    (
        "multilinestring-on-a-tile-edge",  # y = 900 is the top edge of row 9, not row 8
        [_feat({"type": "MultiLineString", "coordinates": [[[950, 50], [950, 250]], [[50, 900], [150, 900]]]},
               objectType="annotation", classification={"name": "Margin", "color": [0, 0, 255]})],
        [("Margin", "line", [9, 19, 29, 90, 91])],
        {}, [],
    ),
    (
        "point",
        [_feat({"type": "Point", "coordinates": [555, 555]}, objectType="annotation",
               classification={"name": "Immune cells", "color": [0, 200, 0]})],
        [("Immune cells", "points", [55])],
        {}, [],
    ),
    (
        "multipoint-3d",  # QuPath's Points tool; a z coordinate is dropped
        [_feat({"type": "MultiPoint", "coordinates": [[10, 10, 0], [999, 999, 0], [450, 150, 0]]},
               objectType="annotation", classification={"name": "Immune cells", "color": [0, 200, 0]})],
        [("Immune cells", "points", [0, 14, 99])],
        {}, [],
    ),
    (
        "geometrycollection",  # split by kind: a region and a point
        [_feat({"type": "GeometryCollection", "geometries": [
            _poly(_sq(0, 0, 200, 200)), {"type": "Point", "coordinates": [750, 750]}]},
            objectType="annotation", classification={"name": "Tumor", "color": [200, 0, 0]})],
        [("Tumor", "region", [0, 1, 10, 11]), ("Tumor", "points", [77])],
        {}, [],
    ),
    (
        "null-geometry-tma-core-root",  # named in the message, never a region
        [_feat(None, objectType="annotation", name="Lost ROI"),
         _feat({"type": "Polygon", "coordinates": []}, objectType="annotation"),
         _feat(_poly(_sq(0, 0, 500, 500)), objectType="tmaCore", name="A-1"),
         {**_feat(_poly(_sq(0, 0, 100, 100))), "id": "PathRootObject"},
         _feat(_poly(_sq(600, 0, 800, 100)), objectType="annotation", name="kept", isLocked=True,
               color=[10, 20, 30])],
        [("Unclassified", "region", [6, 7])],
        {}, ["'Lost ROI' (no geometry)", "feature #2 (no geometry)", "'A-1' (TMA core)", "root object"],
    ),
    (
        "bare-geometries-and-bow-tie",  # plain GeoJSON; a self-crossing outline is repaired
        [_poly(_sq(0, 0, 100, 100)),
         _poly([[200, 200], [400, 400], [400, 200], [200, 400], [200, 200]])],
        [("Unclassified", "region", [0]), ("Unclassified", "region", [22, 23, 32, 33])],
        {}, [],
    ),
    (
        "unknown-object-type",  # QuPath reads an unknown type as an annotation
        [_feat(_poly(_sq(0, 0, 100, 100)), objectType="scribble", classification={"name": "Tumor", "color": [200, 0, 0]})],
        [("Tumor", "region", [0])],
        {}, [],
    ),
]


def _tiles(geometry: object) -> list[int]:
    res = labels_for_shapes([geometry], [0], GRID, T, pixel_edges=True)
    return np.flatnonzero(res.labels == 0).tolist()


@pytest.mark.parametrize(
    ("doc", "expected", "detections", "unread"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_qupath_dialects_label_the_right_tiles(
    tmp_path: Path, doc: object, expected: list, detections: dict, unread: list
) -> None:
    path = tmp_path / "objects.geojson"
    path.write_text(json.dumps(doc))
    objs = read_qupath_geojson(path)
    got = [(a.class_name, a.kind, _tiles(a.geometry)) for a in objs.annotations]
    assert got == expected
    assert dict(Counter(a.object_type for a in objs.detections)) == detections
    assert len(objs.unread) == len(unread)
    for text in unread:
        assert any(text in u for u in objs.unread), (text, objs.unread)
    message = objs.message()
    assert "\\n" not in message and f"{len(expected)} annotation(s) read" in message
    for kind, n in detections.items():
        assert f"{n} {'TMA core' if kind == 'tmaCore' else kind}(s)" in message
    # round trip: written as QuPath reads it, read back to the same objects and tiles
    again = tmp_path / "again.geojson"
    annotations_to_geojson(objs.annotations, path=again)
    for feature in json.loads(again.read_text())["features"]:
        cls = feature["properties"].get("classification")
        assert cls is None or len(cls["color"]) == 3  # QuPath needs a colour with the name
    back = read_qupath_geojson(again)
    assert [(a.class_name, a.kind, _tiles(a.geometry)) for a in back.annotations] == expected
    for a, b in zip(objs.annotations, back.annotations, strict=True):
        assert a.geometry.equals(b.geometry) and a.geometry.area == pytest.approx(b.geometry.area)
        assert (a.name, a.locked) == (b.name, b.locked)
        assert b.colour == (a.colour or (64, 64, 64) if a.class_name != "Unclassified" else a.colour)
        assert b.uid is not None and a.uid in (None, b.uid)  # QuPath's UUID kept, or a new one
    assert back.detections == [] and back.unread == []


def test_case_details_kept(tmp_path: Path) -> None:
    """What the case table does not show: colours, UUIDs, locks, notes."""

    def read(case_id: str) -> Any:
        doc = next(c[1] for c in CASES if c[0] == case_id)
        path = tmp_path / f"{case_id}.geojson"
        path.write_text(json.dumps(doc))
        return read_qupath_geojson(path)

    hole = read("0.4-polygon-with-hole").annotations[0]
    assert hole.uid == UUID and hole.colour == (200, 0, 0) and len(hole.geometry.interiors) == 1
    legacy = read("0.2-legacy-id-parentClass").annotations[0]
    assert legacy.colour == (200, 0, 0) and legacy.uid is None  # 0xFFC80000; the type id dropped
    kept = read("null-geometry-tma-core-root").annotations[0]
    assert kept.locked and kept.name == "kept" and kept.colour == (10, 20, 30)
    assert "1 self-intersecting polygon(s) repaired" in read("bare-geometries-and-bow-tie").message()
    assert "unknown type 'scribble' read as annotations" in read("unknown-object-type").message()


@pytest.mark.parametrize(
    ("geometry", "match"),
    [
        ({"type": "LineString", "coordinates": [[0, 0]]}, "feature #1 has a malformed 'LineString'"),
        ({"type": "Polygon", "coordinates": "abc"}, "malformed 'Polygon'"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [float("nan"), 1], [0, 0]]]}, "NaN"),
    ],
)
def test_malformed_geometry_is_named(tmp_path: Path, geometry: dict, match: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps([_feat(geometry, objectType="annotation")]))
    with pytest.raises(GpfmError, match=match):
        read_qupath_geojson(path)


def test_shapes_to_geojson_writes_holes_qupath_reads(tmp_path: Path) -> None:
    tri = np.array([[10, 10], [200, 15.5], [50, 300]])
    square = np.array([[0, 0], [100, 0], [100, 100], [0, 100]])
    hole = np.array([[40, 40], [60, 40], [60, 60], [40, 60]])
    path = tmp_path / "ann.geojson"
    fc = shapes_to_geojson(
        [tri, square, Polygon([(0, 0), (5, 0), (5, 5)])],
        ["Tumor", "Stroma", "Tumor: Positive"],
        {"Tumor": (1.0, 0.0, 0.0), "Stroma": "#00ff80"},
        path=path,
        holes=[[], [hole], []],
    )
    on_disk = json.loads(path.read_text())
    assert on_disk == fc and fc["type"] == "FeatureCollection"
    f0 = fc["features"][0]
    assert f0["type"] == "Feature" and f0["geometry"]["type"] == "Polygon"
    ring = f0["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 4  # closed
    assert f0["properties"] == {
        "objectType": "annotation",
        "classification": {"name": "Tumor", "color": [255, 0, 0]},
    }
    # no colour known: QuPath's default class colour, never a classification it cannot read
    assert fc["features"][2]["properties"]["classification"] == {
        "name": "Tumor: Positive", "color": [64, 64, 64],
    }
    assert not list(tmp_path.glob("*.tmp-*"))
    back = read_qupath_geojson(path).annotations
    assert [a.class_name for a in back] == ["Tumor", "Stroma", "Tumor: Positive"]
    assert back[1].colour == (0, 255, 128)
    assert back[0].geometry.equals(Polygon(tri))
    assert back[1].geometry.equals(Polygon(square, [hole]))
    assert back[1].geometry.area == 100 * 100 - 20 * 20

@pytest.mark.parametrize(
    "text", ["not json at all", '{"hello": 1}', "[1, 2]", '{"type": "Topology"}']
)
def test_read_rejects_non_geojson(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.geojson"
    path.write_text(text)
    with pytest.raises(GpfmError, match="GeoJSON"):
        read_qupath_geojson(path)


def test_tile_predictions_geojson(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [224, 0], [448, 224]], np.int64)
    labels = np.array([1, -1, 0])
    conf = np.array([0.9, 0.2, 0.61])
    fc = predictions_to_geojson(
        coords,
        224,
        labels,
        NAMES,
        [(255, 0, 0), (0, 0, 255)],
        path=tmp_path / "p.geojson",
        confidence=conf,
    )
    feats = fc["features"]
    assert len(feats) == 2  # unlabelled tile skipped
    assert feats[0]["geometry"]["coordinates"] == [[[0, 0], [224, 0], [224, 224], [0, 224], [0, 0]]]
    assert feats[0]["properties"]["objectType"] == "detection"
    assert feats[0]["properties"]["classification"] == {"name": "Stroma", "color": [0, 0, 255]}
    assert feats[1]["properties"]["measurements"] == {"confidence": 0.61}
    back = read_qupath_geojson(tmp_path / "p.geojson")
    assert back.annotations == [] and len(back.detections) == 2
    assert [a.class_name for a in back.detections] == ["Stroma", "Tumor"]
    assert back.detections[1].object_type == "detection"
    assert back.detections[1].geometry.equals(box(448, 224, 672, 448))


def test_merged_predictions_have_exact_area(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rc = np.argwhere(rng.random((12, 15)) < 0.6)
    coords = (rc[:, ::-1] * 100 + [30, 50]).astype(np.int64)  # (x, y), origin offset
    labels = rng.integers(0, 2, len(coords))
    fc = predictions_to_geojson(
        coords, 100, labels, NAMES, None, merge=True, object_type="annotation"
    )
    assert len(fc["features"]) == 2
    for feat, c in zip(fc["features"], (0, 1), strict=True):
        geom = feat["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        area = sum(
            _ring_area(np.array(p[0])) - sum(_ring_area(np.array(h)) for h in p[1:]) for p in polys
        )
        assert area == pytest.approx(100 * 100 * int((labels == c).sum()))
        assert feat["properties"]["measurements"]["tiles"] == int((labels == c).sum())
    with pytest.raises(GpfmError, match="stride"):
        predictions_to_geojson(
            coords + np.arange(len(coords))[:, None], 100, labels, NAMES, merge=True
        )


def test_merged_regions_keep_holes_and_split_at_corners() -> None:
    # a ring of 8 cells around a hole, and one cell touching it only at a corner
    cells = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)] + [(3, 3)]
    coords = np.array(cells, np.int64) * 10
    fc = predictions_to_geojson(coords, 10, np.zeros(len(cells), int), ["a"], merge=True)
    geom = fc["features"][0]["geometry"]
    assert geom["type"] == "MultiPolygon" and len(geom["coordinates"]) == 2  # 4-connectivity
    ring = next(p for p in geom["coordinates"] if len(p) == 2)  # the part with a hole
    assert Polygon(ring[0]).equals(box(0, 0, 30, 30)) and Polygon(ring[1]).equals(box(10, 10, 20, 20))
    assert len(ring[0]) == 5  # corners only, no vertices left mid-edge
    rng = np.random.default_rng(5)
    cells = np.argwhere(rng.random((20, 20)) < 0.55)
    fc = predictions_to_geojson(cells * 10, 10, np.zeros(len(cells), int), ["a"], merge=True)
    geom = fc["features"][0]["geometry"]
    polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    total = sum(_ring_area(np.array(p[0])) - sum(_ring_area(np.array(h)) for h in p[1:]) for p in polys)
    assert total == 100 * len(cells)


def test_predictions_csv(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [224, 448]], np.int64)
    proba = np.array([[0.2, 0.8], [0.7, 0.3]])
    path = predictions_to_csv(
        coords,
        proba.argmax(1),
        proba.max(1),
        NAMES,
        path=tmp_path / "p.csv",
        tile_size_level0=224,
        probabilities=proba,
    )
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == [
        "x",
        "y",
        "width",
        "height",
        "class",
        "confidence",
        "p_Tumor",
        "p_Stroma",
    ]
    assert rows[1] == {
        "x": "224",
        "y": "448",
        "width": "224",
        "height": "224",
        "class": "Tumor",
        "confidence": "0.7",
        "p_Tumor": "0.7",
        "p_Stroma": "0.3",
    }
    with pytest.raises(GpfmError, match="probabilities"):
        predictions_to_csv(
            coords,
            [0, 1],
            [1, 1],
            NAMES,
            path=tmp_path / "q.csv",
            tile_size_level0=224,
            probabilities=proba[:, :1],
        )


def test_colour_conversion() -> None:
    assert to_rgb255((1.0, 0.5, 0.0, 1.0)) == (255, 128, 0)  # napari RGBA floats
    assert to_rgb255([255, 0, 10]) == (255, 0, 10)
    assert to_rgb255(np.array([1, 1, 1])) == (1, 1, 1)  # integers are 0-255
    assert to_rgb255("#0a0B0c") == (10, 11, 12)
    with pytest.raises(GpfmError, match="rrggbb"):
        to_rgb255("#12")


def test_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(GpfmError, match="one per polygon"):
        shapes_to_geojson([np.zeros((3, 2))], [], None)
    with pytest.raises(GpfmError, match="K >= 3"):
        shapes_to_geojson([np.zeros((2, 2))], ["a"], None)
    with pytest.raises(GpfmError, match="does not exist"):
        shapes_to_geojson([np.eye(3)[:, :2]], ["a"], None, path=tmp_path / "no" / "x.geojson")
