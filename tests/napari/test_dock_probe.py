"""Probe tab: annotate -> debounced threaded training -> prediction / confidence layers, files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dock_support import tile_rect
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.key_bindings import KeyBinding

from gpfm_core.analysis import LinearProbe, labels_for_shapes, read_qupath_geojson
from napari_gpfm._widget import _overlays as ov

pytest_plugins = ["_dock_support"]


def _press(layer: Any, key: str) -> None:
    layer.keymap[KeyBinding.from_str(key)](layer)


def test_annotate_train_predict_save_export(
    embedded: Any, qtbot: Any, tmp_path: Path, notes: Any
) -> None:
    viewer, dock, session = embedded
    tab = dock.probe_tab
    dock.tabs.setCurrentWidget(tab)
    assert tab.classes.names == ["tumour", "stroma"]
    shapes, points = tab.ensure_layers()
    assert shapes.name == f"gpfm: annotations ({session.name})"
    assert points.name == f"gpfm: annotation points ({session.name})"
    assert ov.info(shapes) == {"slide_id": session.key, "kind": "annotations"}

    # two regions of tiles: the top rows and the bottom rows of the embedded area
    rows = session.grid_rc[:, 0]
    top = np.flatnonzero(rows <= np.quantile(rows, 0.15))
    bottom = np.flatnonzero(rows >= np.quantile(rows, 0.85))
    _press(shapes, "1")
    assert tab.classes.current == 0
    shapes.add_rectangles(tile_rect(session, top))
    # one class only -> a clear message, no training
    qtbot.waitUntil(lambda: "Cannot train" in tab.report_label.text(), timeout=10_000)
    assert "only class 'tumour'" in tab.report_label.text() and tab.trainings == 0

    _press(shapes, "2")
    assert tab.classes.current == 1
    shapes.add_rectangles(tile_rect(session, bottom))
    np.testing.assert_array_equal(shapes.features["class"], [0, 1])
    # and a shape far outside the slide: ignored and counted
    shapes.add_rectangles(
        np.array([[-900.0, -900.0], [-900.0, -800.0], [-800.0, -800.0], [-800.0, -900.0]])
    )
    qtbot.waitUntil(lambda: tab.trainings == 1, timeout=120_000)  # debounce -> worker

    polys = [np.asarray(d)[:, ::-1] for d in shapes.data]
    ref = labels_for_shapes(polys, [0, 1, 1], session.coords, session.tile_size)
    assert ref.n_outside == 1 and tab.n_outside == 1
    assert tab.report.n_per_class == {
        "tumour": int((ref.labels == 0).sum()),
        "stroma": int((ref.labels == 1).sum()),
    }
    text = tab.report_label.text()
    assert (
        f"tumour: {(ref.labels == 0).sum()}" in text
        and "CV balanced accuracy" in text
        and "1 annotation(s) outside" in text
    )

    pred_layer = ov.find(viewer, ov.PREDICTION, session)
    conf_layer = ov.find(viewer, ov.CONFIDENCE, session)
    assert isinstance(pred_layer.colormap, DirectLabelColormap)
    np.testing.assert_allclose(
        pred_layer.colormap.map(np.array([1, 2])), tab.classes.rgba(), atol=1e-6
    )
    rc = session.grid_rc
    np.testing.assert_array_equal(pred_layer.data[rc[:, 0], rc[:, 1]], session.prediction + 1)
    np.testing.assert_allclose(conf_layer.data[rc[:, 0], rc[:, 1]], session.confidence, atol=1e-6)
    # the same fit done independently on the same labels gives the same map
    twin = LinearProbe()
    twin.fit(session.features, ref.labels, class_names=["tumour", "stroma"])
    np.testing.assert_array_equal(twin.predict(session.features)[0], session.prediction)
    labelled = ref.labels >= 0
    assert np.mean(session.prediction[labelled] == ref.labels[labelled]) > 0.6  # better than chance

    # a point annotation retrains (debounced) and the same layers are updated in place
    _press(points, "1")
    points.add(np.array([session.tile_center(int(bottom[0]))[::-1]]))
    qtbot.waitUntil(lambda: tab.trainings == 2, timeout=120_000)
    assert ov.find(viewer, ov.PREDICTION, session) is pred_layer
    assert ov.layers_of(viewer, session.key, ("prediction",)) == [pred_layer]

    # save / load into a fresh probe -> same predictions
    probe_path = tab.save_probe(tmp_path / "probe.safetensors")
    loaded = LinearProbe.load(probe_path)
    np.testing.assert_array_equal(loaded.predict(session.features)[0], session.prediction)
    before = session.prediction.copy()
    tab.probe = None
    tab.load_probe(probe_path)
    np.testing.assert_array_equal(session.prediction, before)

    # export GeoJSON (annotations + tile predictions) and CSV, import the annotations again
    gj = tab.export_geojson(tmp_path / "out.geojson")
    objs = read_qupath_geojson(gj)
    assert len(objs.annotations) == 4  # 3 rectangles + the point (a MultiPoint of its class)
    assert len(objs.detections) == session.n_tiles
    assert [(a.class_name, a.kind) for a in objs.annotations] == [
        ("tumour", "region"), ("stroma", "region"), ("stroma", "region"), ("tumour", "points"),
    ]  # fmt: skip
    with open(tab.export_csv(tmp_path / "tiles.csv")) as fh:
        rows_csv = list(csv.DictReader(fh))
    assert len(rows_csv) == session.n_tiles
    assert rows_csv[0]["class"] == tab.probe.class_names[session.prediction[0]]

    viewer.layers.remove(shapes)
    viewer.layers.remove(points)
    n = tab.import_geojson(gj)
    assert n == 4
    new_shapes = ov.find(viewer, ov.ANNOTATIONS, session)
    np.testing.assert_array_equal(new_shapes.features["class"], [0, 1, 1])
    for a, b in zip(new_shapes.data, polys, strict=True):
        np.testing.assert_allclose(np.asarray(a)[:, ::-1], b, atol=1e-3)
    new_points = ov.find(viewer, ov.ANNOTATION_POINTS, session)
    np.testing.assert_allclose(new_points.data, [session.tile_center(int(bottom[0]))[::-1]])
    assert new_points.features["class"].tolist() == [0]
    assert any(f"{session.n_tiles} detection(s) left out" in m for m in notes())
    assert all("\n" not in m for m in notes())


def test_class_editing_and_apply_without_probe(embedded: Any, notes: Any) -> None:
    _, dock, session = embedded
    tab = dock.probe_tab
    tab.classes.add_class("necrosis")
    tab.classes.rename_class(0, "tumor")
    tab.classes.set_colour(2, (10, 20, 30))
    assert tab.classes.names == ["tumor", "stroma", "necrosis"]
    assert tab.classes.colours[2] == (10, 20, 30)
    shapes, _ = tab.ensure_layers()
    tab.classes.set_current(2)
    shapes.add_rectangles(np.array([[0.0, 0.0], [0.0, 300.0], [300.0, 300.0], [300.0, 0.0]]))
    tab.classes.set_current(1)
    shapes.add_rectangles(
        np.array([[400.0, 400.0], [400.0, 700.0], [700.0, 700.0], [700.0, 400.0]])
    )
    np.testing.assert_array_equal(shapes.features["class"], [2, 1])
    np.testing.assert_allclose(shapes.edge_color[0][:3], np.array([10, 20, 30]) / 255, atol=1e-6)
    tab.classes.remove_class(1)  # its shape goes, indices above shift down
    assert tab.classes.names == ["tumor", "necrosis"]
    np.testing.assert_array_equal(shapes.features["class"], [1])
    tab.apply_combo.setCurrentText(session.name)
    tab.buttons["apply"].click()  # no probe yet -> one line, no traceback
    assert any("no probe yet" in m for m in notes())


def _box(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_qupath_holes_survive_import_labelling_edit_and_export(
    embedded: Any, tmp_path: Path, notes: Any
) -> None:
    """A QuPath annotation with an erased hole, in a file of mixed dialects, through the dock."""
    import json

    from napari_gpfm._widget import _probe_io as pio

    _, dock, session = embedded
    tab = dock.probe_tab
    rc, t = session.grid_rc, session.tile_size
    index = session.index_raster
    # a tile whose 5x5 neighbourhood is all embedded: the region; its 3x3 core: the hole
    q = next(
        i for i in range(session.n_tiles)
        if (r := rc[i, 0]) >= 2 and (c := rc[i, 1]) >= 2
        and (index[r - 2 : r + 3, c - 2 : c + 3] >= 0).all()
    )  # fmt: skip
    region = index[rc[q, 0] - 2 : rc[q, 0] + 3, rc[q, 1] - 2 : rc[q, 1] + 3].ravel()
    hole = index[rc[q, 0] - 1 : rc[q, 0] + 2, rc[q, 1] - 1 : rc[q, 1] + 2].ravel()

    def edges(tiles: np.ndarray) -> tuple[float, float, float, float]:  # QuPath px edges
        xy = session.coords[tiles]
        return *(xy.min(axis=0) + 1.0), *(xy.max(axis=0) + t - 1.0)  # a pixel inside

    outer_box, hole_box = edges(region), edges(hole)
    far = np.flatnonzero(rc[:, 0] >= rc[:, 0].max() - 3)  # stroma: the last 4 rows
    assert rc[far, 0].min() > rc[q, 0] + 2  # away from the tumour region
    uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    doc = [  # QuPath 0.4 with a UUID, 0.3 (object_type, string class), 0.2 (legacy id)
        {"type": "Feature", "id": uid,
         "geometry": {"type": "Polygon", "coordinates": [_box(*outer_box), _box(*hole_box)]},
         "properties": {"objectType": "annotation", "name": "erased",
                        "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_box(*edges(far))]},
         "properties": {"object_type": "annotation", "classification": "Stroma"}},
        {"type": "Feature", "id": "PathCellObject",
         "geometry": {"type": "Polygon", "coordinates": [_box(*edges(far[:1]))]},
         "properties": {"classification": {"name": "Negative", "colorRGB": -16776961}}},
        {"type": "Feature", "geometry": None, "properties": {"objectType": "annotation", "name": "Lost ROI"}},
    ]  # fmt: skip
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(doc))

    assert tab.import_geojson(path) == 2
    # nothing was drawn with the starting classes: the file's classes replace them
    assert tab.classes.names == ["Tumor", "Stroma"]  # the cell's "Negative" is not a class
    message = notes()[-1]
    assert "1 cell(s) left out" in message and "'Lost ROI' (no geometry)" in message
    assert "1 hole(s) kept" in message
    shapes, points = tab.ensure_layers()
    tumor, stroma = tab.classes.names.index("Tumor"), tab.classes.names.index("Stroma")

    # labelling uses the true geometry: the hole's 9 tiles are not Tumor
    ann = pio.collect(shapes, points)
    tiles = pio.label_tiles(session, ann)
    expected = np.full(session.n_tiles, -1)
    expected[np.setdiff1d(region, hole)] = tumor
    expected[far] = stroma
    np.testing.assert_array_equal(tiles.labels, expected)
    assert tiles.groups[region[0]] != tiles.groups[far[0]]

    # the panel says how the CV score was computed: one annotation per class, cut in blocks
    assert tab.train(sync=True)
    text = tab.report_label.text()
    assert "CV balanced accuracy: " in text and "5-fold CV grouped by annotation" in text
    assert "'Tumor', 'Stroma' drawn once, cut into" in text and "scaler fitted" in text

    # the round trip back to QuPath keeps the hole, the name and the UUID
    objs = read_qupath_geojson(tab.export_geojson(tmp_path / "back.geojson"))
    back = {a.class_name: a for a in objs.annotations}
    assert back["Tumor"].uid == uid and back["Tumor"].name == "erased"
    assert [list(r.coords) for r in back["Tumor"].geometry.interiors] == [
        [tuple(p) for p in _box(*hole_box)]
    ]

    # moving the whole shape keeps its hole (moved too)
    data = [np.asarray(d).copy() for d in shapes.data]
    data[0] += [0.0, session.stride]  # one tile to the right, in (row, col)
    shapes.data = data
    moved = pio.collect(shapes, points)
    assert moved.stored[0] is not None and len(moved.geometries[0].interiors) == 1
    assert moved.geometries[0].interiors[0].bounds[0] == pytest.approx(hole_box[0] - 0.5 + session.stride)

    # editing a vertex replaces the stored geometry by the edited outline (the hole is gone)
    data[0][1] += [0.0, 5.0]
    shapes.data = data
    edited = pio.collect(shapes, points)
    assert edited.stored[0] is None and len(edited.geometries[0].interiors) == 0
    labels_after = pio.label_tiles(session, edited).labels
    shifted_hole = index[rc[hole, 0], np.minimum(rc[hole, 1] + 1, index.shape[1] - 1)]
    assert (labels_after[shifted_hole[shifted_hole >= 0]] == tumor).any()
    objs = read_qupath_geojson(tab.export_geojson(tmp_path / "edited.geojson"))
    tumor_back = next(a for a in objs.annotations if a.class_name == "Tumor")
    assert len(tumor_back.geometry.interiors) == 0 and tumor_back.uid != uid


def test_probe_files_know_the_weights_and_tiling_they_were_trained_on(
    embedded: Any, tmp_path: Path, notes: Any
) -> None:
    from dataclasses import replace

    from _probe_files import write_older_probe
    from gpfm_core.errors import GpfmError

    _, dock, session = embedded
    tab = dock.probe_tab
    tab.auto_check.setChecked(False)
    shapes, _ = tab.ensure_layers()
    rows = session.grid_rc[:, 0]
    for cls, band in enumerate((rows <= np.quantile(rows, 0.2), rows >= np.quantile(rows, 0.8))):
        tab.classes.set_current(cls)
        shapes.add_rectangles(tile_rect(session, np.flatnonzero(band)))
    assert tab.train(sync=True)
    path = tab.save_probe(tmp_path / "probe.safetensors")
    saved = LinearProbe.load(path)
    assert saved.encoder == "tiny-vit" and saved.weights_hash == session.weights_hash
    assert saved.tiling == {"requested_mpp": 0.5, "tile_px": 112, "overlap_px": 0}

    # loaded back, it is applied only to slides embedded as it was trained
    tab.probe, tab.probe_key = None, None
    tab.load_probe(path)
    assert tab.probe_key == session.feature_key
    other_tiling = replace(session, key="x", tiling={**session.tiling, "tile_px": 96})
    other_weights = replace(session, key="y", weights_hash="0" * 64)
    for other, what in ((other_tiling, "tile size"), (other_weights, "weights")):
        with pytest.raises(GpfmError, match=f"its {what} differ"):
            tab.check_probe_fits(other)
    tab.check_probe_fits(session)

    # a file written before the weights and tiling were recorded: a warning, name and width only
    tab.load_probe(write_older_probe(path, tmp_path / "old.safetensors"))
    assert tab.probe_key is None
    assert [m for m in notes() if "does not record the encoder weights and tiling" in m]
    tab.check_probe_fits(other_tiling)  # only the name and width can be checked
    with pytest.raises(GpfmError, match="another encoder"):
        tab.check_probe_fits(replace(session, key="z", encoder="uni"))


def test_imported_classes_join_classes_in_use(embedded: Any, tmp_path: Path) -> None:
    """Classes the user has made or drawn with stay; the file's new ones are added."""
    import json

    _, dock, session = embedded
    tab = dock.probe_tab
    tab.classes.add_class("necrosis")
    x, y = (float(v) for v in session.coords[0])
    t = float(session.tile_size)
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [_box(x + 1, y + 1, x + t - 1, y + t - 1)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
    ]}  # fmt: skip
    path = tmp_path / "one.geojson"
    path.write_text(json.dumps(doc))
    assert tab.import_geojson(path) == 1
    assert tab.classes.names == ["tumour", "stroma", "necrosis", "Tumor"]
