"""Each slide owns its state: two slides of the same size open at once (one the mirror of the
other), driven through the dock's widgets in a real viewer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dock_support import (
    ENCODER,
    click,
    embed_in_dock,
    make_dock,
    open_slide_layer,
    tile_rect,
    tile_world_centre,
)
from qtpy.QtCore import Qt

from gpfm_core.analysis import labels_for_shapes
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid
from napari_gpfm._layers import tissue_from_layer
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._session import SlideSession

pytest_plugins = ["_dock_support"]


def _side_by_side(slide_layer: Any, session_or_width: float) -> None:
    """Move a slide layer to the right of one at the origin (2,400 level-0 px further)."""
    slide_layer.translate = (0.0, 2400 * float(session_or_width))


def _two_slides(make_viewer: Any, a: Path, b: Path, out: Path) -> tuple[Any, Any, Any, Any]:
    """``(viewer, dock, a_layer, b_layer)``: slides ``a`` and ``b`` side by side, a dock on ``out``."""
    viewer = make_viewer()
    a_layer = open_slide_layer(viewer, a)
    b_layer = open_slide_layer(viewer, b)
    _side_by_side(b_layer, 0.499)
    return viewer, make_dock(viewer, out), a_layer, b_layer


def _polys(shapes: Any) -> list[np.ndarray]:
    return [np.asarray(d)[:, ::-1] for d in shapes.data]


def _label_counts(session: SlideSession, shapes: Any) -> dict[str, int]:
    ref = labels_for_shapes(_polys(shapes), list(shapes.features["class"]), session.coords,
                            session.tile_size)  # fmt: skip
    return {"tumour": int((ref.labels == 0).sum()), "stroma": int((ref.labels == 1).sum())}


def _annotate(tab: Any, session: SlideSession, *, axis: int, q: float) -> Any:
    """Class 0 around the tiles in the first ``q`` of grid rows (axis 0) or columns (axis 1),
    class 1 around those in the last ``q``, on ``session``'s own Shapes layer."""
    along = session.grid_rc[:, axis]
    first = np.flatnonzero(along <= np.quantile(along, q))
    second = np.flatnonzero(along >= np.quantile(along, 1 - q))
    shapes, _points = tab.ensure_layers()
    assert ov.info(shapes)["slide_id"] == session.key
    tab.classes.set_current(0)
    shapes.add_rectangles(tile_rect(session, first))
    tab.classes.set_current(1)
    shapes.add_rectangles(tile_rect(session, second))
    return shapes


def test_annotations_train_only_their_own_slide(
    make_napari_viewer: Any, cmu_svs: Path, mirror_png: Path, cmu_embeddings: Path, tmp_path: Path
) -> None:
    viewer, dock, a_layer, b_layer = _two_slides(
        make_napari_viewer, cmu_svs, mirror_png, cmu_embeddings
    )
    tab = dock.probe_tab
    tab.auto_check.setChecked(False)  # the test trains explicitly
    dock.tabs.setCurrentWidget(tab)

    # slide A: annotate its top and bottom rows, train
    a = embed_in_dock(dock, a_layer.name)
    assert tab.session is a
    a_shapes = _annotate(tab, a, axis=0, q=0.15)
    assert tab.train(sync=True)
    a_counts = _label_counts(a, a_shapes)
    assert tab.report.n_per_class == a_counts and tab.trainings == 1

    # B becomes active by being embedded: it has no annotations, A's are not used
    b = embed_in_dock(dock, b_layer.name)
    assert b.key != a.key and b.key == b_layer.metadata["slide_id"]
    assert tab.session is b
    assert not tab.train(sync=True)
    assert f"No annotations on {b.name}" in tab.report_label.text() and tab.trainings == 1
    b_shapes, _ = tab.annotation_layers()
    assert b_shapes is not a_shapes and len(b_shapes.data) == 0 and len(a_shapes.data) == 2
    assert b_shapes.name == f"gpfm: annotations ({b.name})"

    # annotate B (left / right columns) and train: B's tiles with B's shapes
    _annotate(tab, b, axis=1, q=0.2)
    assert tab.train(sync=True)
    b_counts = _label_counts(b, b_shapes)
    assert tab.report.n_per_class == b_counts
    assert b_counts != _label_counts(b, a_shapes)  # A's shapes on B's tiles would differ
    b_pred = ov.find(viewer, ov.PREDICTION, b)
    assert b_pred.data.shape == b.grid_shape and ov.info(b_pred)["slide_id"] == b.key
    np.testing.assert_array_equal(b_pred.data[b.grid_rc[:, 0], b.grid_rc[:, 1]], b.prediction + 1)
    # A's prediction layer still shows A's result
    a_pred = ov.find(viewer, ov.PREDICTION, a)
    assert a_pred is not b_pred and a_pred.data.shape == a.grid_shape
    np.testing.assert_array_equal(a_pred.data[a.grid_rc[:, 0], a.grid_rc[:, 1]], a.prediction + 1)

    # the GeoJSON export of B holds B's annotations at B's coordinates
    feats = json.loads(Path(tab.export_geojson(tmp_path / "b.geojson")).read_text())["features"]
    ann = [f for f in feats if f["properties"].get("objectType") == "annotation"]
    assert len(ann) == 2
    for f, poly in zip(ann, _polys(b_shapes), strict=True):
        ring = np.asarray(f["geometry"]["coordinates"][0], float)
        np.testing.assert_allclose(ring.min(axis=0), poly.min(axis=0) + 0.5, atol=1e-6)

    # A becomes active again by a click on one of its tiles in Explore: A's shapes train
    dock.tabs.setCurrentWidget(dock.explore_tab)
    click(viewer, tile_world_centre(a, a.n_tiles // 2))
    assert dock.store.active is a and tab.session is a
    dock.tabs.setCurrentWidget(tab)
    assert tab.train(sync=True)
    assert tab.report.n_per_class == a_counts
    # ... and a click on B's tile (B sits to the right) makes B active
    dock.tabs.setCurrentWidget(dock.explore_tab)
    bx, by = b.tile_center(3)
    click(viewer, (by * 0.499, bx * 0.499 + b_layer.translate[1]))
    assert dock.store.active is b and tab.session is b


def test_tissue_and_grid_belong_to_their_slide(
    make_napari_viewer: Any, cmu_svs: Path, mirror_png: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    a_layer = open_slide_layer(viewer, cmu_svs)
    b_layer = open_slide_layer(viewer, mirror_png)
    a_id, b_id = a_layer.metadata["slide_id"], b_layer.metadata["slide_id"]
    dock = make_dock(viewer, tmp_path)
    tab = dock.embed_tab

    # Tissue + grid on A; the user keeps one rectangle of A's tissue
    tab.slide_combo.setCurrentText(a_layer.name)
    tab.show_tissue(sync=True)
    a_tissue = ov.find(viewer, ov.TISSUE, slide_id=a_id)
    a_tissue.data = [np.array([[900.0, 600.0], [900.0, 1700.0], [2100.0, 1700.0], [2100.0, 600.0]])]
    a_tissue.features = {"kind": np.array(["tissue"], dtype=object)}
    edited = [np.asarray(d).copy() for d in a_tissue.data]

    # Tissue + grid on B (same size) adds B's own layers and leaves A's edited mask alone
    tab.slide_combo.setCurrentText(b_layer.name)
    _b_tissue, b_grid = tab.show_tissue(sync=True)
    assert ov.find(viewer, ov.TISSUE, slide_id=a_id) is a_tissue
    assert all(np.array_equal(x, y) for x, y in zip(a_tissue.data, edited, strict=True))
    assert ov.find(viewer, ov.TISSUE, slide_id=b_id) is not a_tissue
    assert len(ov.layers_of(viewer, a_id, ("tissue",))) == len(ov.layers_of(viewer, b_id, ("tissue",))) == 1

    # embedding B uses B's tissue, never A's mask of the same size
    b = tab.run(sync=True)
    assert b is not None and b.key == b_id
    with open_slide(mirror_png) as b_slide:
        detected = make_tile_grid(b_slide, mpp=0.5, tile_px=112)
        with_a_mask = make_tile_grid(
            b_slide, mpp=0.5, tile_px=112, tissue=tissue_from_layer(a_tissue, b_slide)
        )
    np.testing.assert_array_equal(b.coords, detected.coords)
    np.testing.assert_array_equal(b.coords, b_grid.coords)
    assert len(with_a_mask) != len(detected)  # what the old matching by size embedded

    # embedding A uses A's edited mask
    tab.slide_combo.setCurrentText(a_layer.name)
    a = tab.run(sync=True)
    with open_slide(cmu_svs) as a_slide:
        expected = make_tile_grid(
            a_slide, mpp=0.5, tile_px=112, tissue=tissue_from_layer(a_tissue, a_slide)
        )
    assert a is not None and 0 < a.n_tiles < len(detected)
    np.testing.assert_array_equal(a.coords, expected.coords)
    for s in (a, b):  # every layer made for a slide carries its id
        for layer in ov.layers_of(viewer, s.key):
            assert layer.name.endswith(f"({s.name})"), layer.name


def _tiny_vit_other_weights(folder: Path) -> Path:
    """tiny-vit's architecture and name with other (seeded) weights, as a checkpoint file."""
    from gpfm_core.encoders import create_encoder
    from gpfm_core.encoders._checkpoint import save_encoder_safetensors

    path = folder / "tiny-vit-seed7.safetensors"
    if not path.exists():
        save_encoder_safetensors(create_encoder(ENCODER, seed=7, device="cpu"), path)
    return path


@pytest.mark.parametrize(
    ("variant", "comparable"),
    [("same", True), ("other weights", False), ("other tiling", False)],
)
def test_retrieval_and_probe_stay_within_one_encoder_weights_and_tiling(
    make_napari_viewer: Any, qtbot: Any, notes: Any, cmu_svs: Path, mirror_png: Path,
    cmu_embeddings: Path, tmp_path: Path, variant: str, comparable: bool,
) -> None:  # fmt: skip
    viewer, dock, a_layer, b_layer = _two_slides(
        make_napari_viewer, cmu_svs, mirror_png, cmu_embeddings
    )
    a = embed_in_dock(dock, a_layer.name)
    tab = dock.embed_tab
    tab.set_out_dir(tmp_path)
    if variant == "other weights":  # the same name and width (64-d), other weights
        tab.encoder_combo.setCurrentText(str(_tiny_vit_other_weights(tmp_path)))
    tab.mpp_spin.setValue(0.5)
    tab.tile_spin.setValue(96 if variant == "other tiling" else 112)
    b = embed_in_dock(dock, b_layer.name)
    assert b.features.shape[1] == a.features.shape[1] == 64 and b.encoder == a.encoder
    assert a.comparable(b) is comparable

    # retrieval from a tile of A searches B only when comparable, and says so
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    rt = dock.retrieve_tab
    rt.k_spin.setValue(50)
    click(viewer, tile_world_centre(a, 7))
    assert rt.searched == ([a.key, b.key] if comparable else [a.key])
    assert {h.key for h in rt.hits} == ({a.key, b.key} if comparable else {a.key})
    text = rt.status.text()
    assert f"Searched: {a.name}" in text
    assert (f"not searched (another encoder, weights or tiling): {b.name}" in text) is (
        not comparable
    )
    qtbot.waitUntil(lambda: not rt.thumbs.running, timeout=60_000)

    # a probe trained on A applies to B only when comparable
    dock.set_active(a)
    pt = dock.probe_tab
    pt.auto_check.setChecked(False)
    _annotate(pt, a, axis=0, q=0.2)
    assert pt.train(sync=True)
    pt.set_session(a)  # refresh the apply list
    pt.apply_combo.setCurrentText(b.name)
    qtbot.mouseClick(pt.buttons["apply"], Qt.MouseButton.LeftButton)
    b_pred = ov.find(viewer, ov.PREDICTION, b)
    if comparable:
        assert b_pred is not None and b.prediction is not None
        np.testing.assert_array_equal(b_pred.data[b.grid_rc[:, 0], b.grid_rc[:, 1]], b.prediction + 1)
    else:
        assert b_pred is None and b.prediction is None
        assert any("another encoder, weights or tiling" in m for m in notes())


@pytest.mark.parametrize("drawn", [True, False], ids=["annotated", "not-annotated"])
def test_closing_a_slide_takes_its_layers_with_it_but_keeps_drawn_annotations(
    make_napari_viewer: Any, notes: Any, cmu_svs: Path, mirror_png: Path, cmu_embeddings: Path,
    drawn: bool,
) -> None:  # fmt: skip
    viewer, dock, a_layer, b_layer = _two_slides(
        make_napari_viewer, cmu_svs, mirror_png, cmu_embeddings
    )
    a = embed_in_dock(dock, a_layer.name)
    b = embed_in_dock(dock, b_layer.name)
    tab = dock.embed_tab
    for layer in (a_layer, b_layer):  # tissue, ink and grid of both
        tab.slide_combo.setCurrentText(layer.name)
        tab.show_tissue(sync=True)
    dock.set_active(a)
    dock.tabs.setCurrentWidget(dock.explore_tab)
    dock.explore_tab.k_spin.setValue(3)
    assert dock.explore_tab.run(sync=True)
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    click(viewer, tile_world_centre(a, 5))  # similarity and the query outline on A
    pt = dock.probe_tab
    pt.auto_check.setChecked(False)
    if drawn:
        _annotate(pt, a, axis=0, q=0.2)
    else:
        pt.ensure_layers()  # empty annotation layers
    kinds_a = {ov.info(ly)["kind"] for ly in ov.layers_of(viewer, a.key)}
    assert {"tissue", "ink", "tile_grid", "coverage", "clusters", "tiles", "similarity",
            "query", "annotations", "annotation_points"} <= kinds_a  # fmt: skip
    b_before = [ly.name for ly in ov.layers_of(viewer, b.key)]
    start = len(notes())

    viewer.layers.remove(a_layer)
    assert dock.store.get(a.key) is None and dock.store.active is b
    left = {ov.info(ly)["kind"] for ly in ov.layers_of(viewer, a.key)}
    said = [m for m in notes()[start:] if "closed" in m]
    if drawn:  # the user's work stays, and a notification says so
        assert left == {"annotations"}  # the points layer held nothing
        (shapes,) = ov.layers_of(viewer, a.key)
        assert len(shapes.data) == 2
        assert len(said) == 1 and shapes.name in said[0] and "kept" in said[0]
    else:
        assert left == set() and said == []
    assert [ly.name for ly in ov.layers_of(viewer, b.key)] == b_before  # B untouched
    assert b_layer in viewer.layers and dock.explore_tab.session is b
