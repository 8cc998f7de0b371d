"""Probe tab: annotate -> debounced threaded training -> prediction / confidence layers, files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
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
    anns = read_qupath_geojson(gj)
    kinds = [a.object_type for a in anns]
    assert kinds.count("annotation") == 3 and kinds.count("detection") == session.n_tiles
    assert [a.class_name for a in anns if a.object_type == "annotation"] == [
        "tumour",
        "stroma",
        "stroma",
    ]
    with open(tab.export_csv(tmp_path / "tiles.csv")) as fh:
        rows_csv = list(csv.DictReader(fh))
    assert len(rows_csv) == session.n_tiles
    assert rows_csv[0]["class"] == tab.probe.class_names[session.prediction[0]]

    viewer.layers.remove(shapes)
    viewer.layers.remove(points)
    n = tab.import_geojson(gj)
    assert n == 3
    new_shapes = ov.find(viewer, ov.ANNOTATIONS, session)
    np.testing.assert_array_equal(new_shapes.features["class"], [0, 1, 1])
    for a, b in zip(new_shapes.data, polys, strict=True):
        np.testing.assert_allclose(np.asarray(a)[:, ::-1], b, atol=1e-3)
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
