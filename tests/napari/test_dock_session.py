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
    emb = load_embeddings(cmu_embeddings / "cmu_small_region.h5")
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
