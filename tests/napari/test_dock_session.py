"""Plain-Python parts of the dock (sessions, annotation geometry) and the scatter widget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from napari.layers import Points, Shapes
from qtpy.QtCore import QPoint, Qt

from gpfm_core.embed import load_embeddings
from gpfm_core.errors import GpfmError
from napari_gpfm._widget import _probe_io as pio
from napari_gpfm._widget._scatter import ScatterPlot
from napari_gpfm._widget._session import SessionStore, SlideSession

pytest_plugins = ["_dock_support"]


@pytest.fixture
def cmu_session(cmu_embeddings: Path, cmu_svs: Path) -> SlideSession:
    (path,) = cmu_embeddings.rglob("cmu_small_region.h5")
    emb = load_embeddings(path)
    return SlideSession.from_embeddings(
        emb, key="cmu", name="cmu", slide_path=cmu_svs, path=emb.path
    )


def test_session_geometry_matches_the_embeddings_file(cmu_session: SlideSession) -> None:
    s = cmu_session
    assert s.mpp == pytest.approx((0.499, 0.499))
    assert s.tile_size == s.stride == round(112 * 0.5 / 0.499)  # 112 px read at 0.5 µm/px
    raster = s.index_raster
    assert raster.shape == s.grid_shape and int((raster >= 0).sum()) == s.n_tiles
    for i in (0, s.n_tiles // 2, s.n_tiles - 1):
        x0, y0 = s.coords[i]
        assert s.tile_at(x0, y0) == i and s.tile_at(x0 + s.tile_size - 1, y0 + s.tile_size - 1) == i
        assert s.tile_center(i) == (x0 + (s.tile_size - 1) / 2, y0 + (s.tile_size - 1) / 2)
    assert s.tile_at(-10, -10) is None
    values = np.arange(s.n_tiles, dtype=np.float32)
    r = s.raster(values, fill=-1)
    np.testing.assert_array_equal(r[s.grid_rc[:, 0], s.grid_rc[:, 1]], values)
    assert int((r == -1).sum()) == r.size - s.n_tiles
    assert s.similarity_index() is s.similarity_index()  # cached


def test_store_keeps_one_session_per_slide(cmu_session: SlideSession) -> None:
    store = SessionStore()
    store.add(cmu_session)
    assert store.active is cmu_session and store.by_name("cmu") is cmu_session and len(store) == 1
    store.remove("cmu")
    assert store.active is None and len(store) == 0


def test_session_rejects_mismatched_arrays() -> None:
    with pytest.raises(GpfmError, match="re-embed"):
        SlideSession(
            key="k", name="n", slide_path=None, features=np.zeros((3, 4)), coords=np.zeros((2, 2)),
            grid_rc=np.zeros((3, 2)), grid_shape=(1, 3), stride=10, tile_size=10, mpp=(1.0, 1.0),
        )  # fmt: skip


def test_collect_reads_classes_and_shape_kinds() -> None:
    shapes = Shapes(ndim=2, features={"class": np.empty(0, int)})
    shapes.feature_defaults = {"class": 1}
    shapes.add_rectangles(np.array([[10.0, 20.0], [10.0, 60.0], [50.0, 60.0], [50.0, 20.0]]))
    shapes.feature_defaults = {"class": 0}
    shapes.add_ellipses(np.array([[0.0, 0.0], [0.0, 40.0], [20.0, 40.0], [20.0, 0.0]]))
    shapes.add_lines(np.array([[0.0, 0.0], [5.0, 5.0]]))
    points = Points(np.array([[7.0, 3.0]]), features={"class": [1]})
    ann = pio.collect(shapes, points)
    # a line labels the tiles it crosses, as QuPath's line annotations do
    assert ann.classes == [1, 0, 0] and ann.skipped == 0 and ann.count == 4
    assert [g.geom_type for g in ann.geometries] == ["Polygon", "Polygon", "LineString"]
    assert ann.stored == [None, None, None]  # drawn, nothing stored beside the layer
    np.testing.assert_allclose(ann.polygons[0], [[20, 10], [60, 10], [60, 50], [20, 50]])  # (x, y)
    assert ann.polygons[1].shape == (48, 2)
    np.testing.assert_allclose(ann.polygons[1].min(axis=0), [0, 0], atol=0.1)
    np.testing.assert_allclose(ann.points, [[3.0, 7.0]])
    assert ann.point_classes == [1]


def test_geojson_uses_qupath_pixel_edges(cmu_session: SlideSession, tmp_path: Path) -> None:
    square = np.array([[100.0, 200.0], [300.0, 200.0], [300.0, 400.0], [100.0, 400.0]])
    ann = pio.Collected([square], [1], np.zeros((0, 2)), [])
    path = pio.export_geojson(
        tmp_path / "a.geojson", cmu_session, ann, ["a", "b"], [(1, 2, 3), (4, 5, 6)]
    )
    feats = json.loads(path.read_text())["features"]
    assert len(feats) == 1 and feats[0]["properties"]["classification"]["name"] == "b"
    assert feats[0]["geometry"]["coordinates"][0][0] == [100.5, 200.5]
    imported = pio.import_geojson(path)
    np.testing.assert_allclose(imported.polygons[0], square)
    assert imported.shape_classes == ["b"] and imported.colours == {"b": (4, 5, 6)}
    with pytest.raises(GpfmError, match="nothing to export"):
        pio.export_geojson(
            tmp_path / "b.geojson",
            cmu_session,
            pio.Collected([], [], np.zeros((0, 2)), []),
            ["a"],
            [(0, 0, 0)],
        )


def test_scatter_click_box_and_highlight(qtbot: Any) -> None:
    plot = ScatterPlot()
    qtbot.addWidget(plot)
    plot.resize(300, 300)
    plot.show()
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.2], [0.9, 0.1]])
    plot.set_data(xy, np.tile([1.0, 0.0, 0.0, 1.0], (4, 1)))
    got: list[np.ndarray] = []
    plot.selection_changed.connect(got.append)
    px = plot.to_pixels()
    qtbot.mouseClick(plot, Qt.MouseButton.LeftButton, pos=QPoint(int(px[2, 0]), int(px[2, 1])))
    assert list(got[-1]) == [2] and list(plot.selected) == [2]
    qtbot.mouseClick(plot, Qt.MouseButton.LeftButton, pos=QPoint(150, 5))  # empty area clears
    assert got[-1].size == 0
    sel = plot.select_box(px[:, 0].min() - 1, px[:, 1].min() - 1, px[2, 0] + 1, px[:, 1].max() + 1)
    assert set(sel) == {0, 2}
    before = plot.renders
    plot.highlight([1])
    assert plot.renders == before + 1 and list(plot.selected) == [1]
    with pytest.raises(ValueError, match="colors"):
        plot.set_data(xy, np.zeros((3, 4)))


def _layers_with(imported: pio.Imported, classes: list[str]) -> tuple[Shapes, Points]:
    """Standalone annotation layers holding ``imported`` (as the Probe tab adds it)."""
    shapes = Shapes(ndim=2, features={"class": np.empty(0, int)})
    pio.add_imported(shapes, imported, [classes.index(n) for n in imported.shape_classes])
    points = Points(
        imported.points[:, ::-1], features={"class": [classes.index(n) for n in imported.point_classes]}
    )
    return shapes, points


def test_multipart_objects_round_trip_as_one(cmu_session: SlideSession, tmp_path: Path) -> None:
    """A MultiPolygon (one part with a hole), a line and QuPath points: shown as napari
    shapes and points, written back as the same QuPath objects."""
    from gpfm_core.analysis import read_qupath_geojson

    uid = "7d444840-9dc0-11d1-b245-5ffdce74fad2"
    a = [[100, 100], [900, 100], [900, 900], [100, 900], [100, 100]]
    hole = [[300, 300], [600, 300], [600, 600], [300, 600], [300, 300]]
    b = [[1200, 100], [1500, 100], [1500, 400], [1200, 400], [1200, 100]]
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": uid, "geometry": {"type": "MultiPolygon", "coordinates": [[a, hole], [b]]},
         "properties": {"objectType": "annotation", "name": "two parts", "isLocked": True,
                        "classification": {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 1000], [800, 1200]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Margin", "color": [0, 0, 255]}}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[50, 60], [70, 80]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Immune", "color": [0, 200, 0]}}},
    ]}  # fmt: skip
    src = tmp_path / "in.geojson"
    src.write_text(json.dumps(doc))
    imported = pio.import_geojson(src)
    assert [k for k, _o, _e in imported.shapes] == ["polygon", "polygon", "path"]
    assert imported.n_holes == 1 and imported.points.shape == (2, 2)
    classes = ["Tumor: Positive", "Margin", "Immune"]
    shapes, points = _layers_with(imported, classes)
    assert shapes.shape_type == ["polygon", "polygon", "path"]

    out = read_qupath_geojson(pio.export_geojson(
        tmp_path / "out.geojson", cmu_session, pio.collect(shapes, points), classes,
        [(200, 0, 0), (0, 0, 255), (0, 200, 0)],
    ))  # fmt: skip
    originals = read_qupath_geojson(src).annotations
    assert [(o.class_name, o.kind) for o in out.annotations] == [
        ("Tumor: Positive", "region"), ("Margin", "line"), ("Immune", "points"),
    ]  # fmt: skip
    for got, want in zip(out.annotations, originals, strict=True):
        assert got.geometry.equals(want.geometry)  # holes and parts exactly as QuPath had them
    assert (out.annotations[0].uid, out.annotations[0].name, out.annotations[0].locked) == (
        uid, "two parts", True,
    )  # fmt: skip

    # one part given another class: two objects; the UUID stays with the first only
    shapes.features.loc[1, "class"] = classes.index("Margin")
    split = pio.annotations_of(pio.collect(shapes, points), classes, [(1, 1, 1)] * 3)
    assert [(o.class_name, o.kind) for o in split[:2]] == [("Tumor: Positive", "region"), ("Margin", "region")]
    assert split[0].uid == uid and split[1].uid is None
    assert len(split[0].geometry.interiors) == 1  # the part with the hole keeps it


def test_geometry_store_lookup_rules() -> None:
    """Unchanged -> stored geometry; moved as a whole -> moved geometry; edited -> outline."""
    from shapely.geometry import Polygon

    outline = np.array([[1000.0, 2000.0], [5000.0, 2000.0], [5000.0, 6000.0], [1000.0, 6000.0]])
    true = Polygon(outline, [[[2000, 3000], [3000, 3000], [3000, 4000], [2000, 4000]]])
    store = pio.GeometryStore()
    store.add(pio.StoredShape(outline, true, "g"))
    assert store.resolve(outline)[1] is true
    # napari keeps float32 vertices: the rounding of level-0 coordinates still matches
    assert store.resolve(outline.astype(np.float32).astype(np.float64) + 1e-4)[1] is true
    shift = np.array([250.0, -80.0])
    moved = store.resolve(outline + shift)
    assert moved is not None and moved[1].equals(
        Polygon(outline + shift, [[[2250, 2920], [3250, 2920], [3250, 3920], [2250, 3920]]])
    )
    edited = outline.copy()
    edited[2] += [10.0, 0.0]
    assert store.resolve(edited) is None
    assert store.resolve(outline[:3]) is None  # a vertex removed
