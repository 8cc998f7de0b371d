"""QuPath GeoJSON / CSV export and import, and merged tile outlines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from gpfm_core.analysis import (
    predictions_to_csv,
    predictions_to_geojson,
    read_qupath_geojson,
    shapes_to_geojson,
)
from gpfm_core.analysis._outline import cell_outlines
from gpfm_core.analysis.io import to_rgb255
from gpfm_core.errors import GpfmError

NAMES = ["Tumor", "Stroma"]


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def test_shapes_roundtrip_qupath_format(tmp_path: Path) -> None:
    tri = np.array([[10, 10], [200, 15.5], [50, 300]])
    square = np.array([[0, 0], [100, 0], [100, 100], [0, 100]])
    hole = np.array([[40, 40], [60, 40], [60, 60], [40, 60]])
    path = tmp_path / "ann.geojson"
    fc = shapes_to_geojson(
        [tri, square],
        ["Tumor", "Stroma"],
        {"Tumor": (1.0, 0.0, 0.0), "Stroma": "#00ff80"},
        path=path,
        holes=[[], [hole]],
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
    assert not list(tmp_path.glob("*.tmp-*"))
    back = read_qupath_geojson(path)
    assert [a.class_name for a in back] == ["Tumor", "Stroma"]
    assert back[1].colour == (0, 255, 128)
    assert np.allclose(back[0].polygon, tri) and back[0].holes == []
    assert np.allclose(back[1].polygon, square) and np.allclose(back[1].holes[0], hole)


def test_read_variants_feature_list_multipolygon_unclassified(tmp_path: Path) -> None:
    sq = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    sq2 = [[20, 20], [30, 20], [30, 30], [20, 20]]
    items = [  # QuPath's default export: a bare list of Features, 0.2-style colorRGB
        {
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": [[sq], [sq2]]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Tumor", "colorRGB": -3670016},
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [sq]},
            "properties": {"name": "roi"},
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}},
    ]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(items))
    with pytest.warns(UserWarning, match="1 non-polygon"):
        anns = read_qupath_geojson(path)
    assert [a.class_name for a in anns] == ["Tumor", "Tumor", "Unclassified"]
    assert anns[0].colour == (200, 0, 0)  # -3670016 = 0xFFC80000
    assert anns[2].name == "roi" and anns[2].colour is None
    assert anns[1].polygon.shape == (3, 2)
    single = tmp_path / "single.geojson"
    single.write_text(json.dumps(items[1]))
    assert len(read_qupath_geojson(single)) == 1


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
    assert [a.class_name for a in back] == ["Stroma", "Tumor"] and back[
        1
    ].object_type == "detection"
    assert np.allclose(back[1].polygon, [[448, 224], [672, 224], [672, 448], [448, 448]])


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


def test_cell_outlines_holes_and_diagonal_touch() -> None:
    cells = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)] + [(3, 3)]
    polys = cell_outlines(np.array(cells))
    assert len(polys) == 2  # diagonal neighbours are not merged (4-connectivity)
    ring, holes = polys[0]
    assert ring.tolist() == [[0, 0], [3, 0], [3, 3], [0, 3]]
    assert [h.tolist() for h in holes] == [[[1, 2], [2, 2], [2, 1], [1, 1]]]
    rng = np.random.default_rng(5)
    cells = np.argwhere(rng.random((20, 20)) < 0.55)
    total = sum(_ring_area(e) - sum(_ring_area(h) for h in hs) for e, hs in cell_outlines(cells))
    assert total == len(cells)


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
