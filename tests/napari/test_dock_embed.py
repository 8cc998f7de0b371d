"""Embed tab: threaded embedding with live coverage, cache reuse, cancel, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from _dock_support import make_dock, open_slide_layer
from qtpy.QtCore import Qt

from gpfm_core.embed import load_embeddings
from napari_gpfm._widget import GpfmDock
from napari_gpfm._widget import _overlays as ov

pytest_plugins = ["_dock_support"]


def test_dock_opens_from_the_npe2_manifest(make_napari_viewer: Any) -> None:
    viewer = make_napari_viewer()
    _widget, dock = viewer.window.add_plugin_dock_widget("napari-gpfm", "GPFM slide analysis")
    assert isinstance(dock, GpfmDock)
    assert [dock.tabs.tabText(i) for i in range(dock.tabs.count())] == [
        "Embed",
        "Explore",
        "Retrieve",
        "Probe",
        "Slide model",
    ]
    assert dock.embed_tab.encoder_combo.findText("tiny-vit") >= 0


def test_threaded_embedding_paints_coverage_then_reuses_the_cache(
    make_napari_viewer: Any, qtbot: Any, cmu_svs: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    slide = open_slide_layer(viewer, cmu_svs)
    dock = make_dock(viewer, tmp_path, batch_size=32)
    tab = dock.embed_tab
    assert tab.slide_combo.currentText() == slide.name
    embedded_signals: list[Any] = []
    tab.embedded.connect(embedded_signals.append)

    qtbot.mouseClick(tab.run_btn, Qt.MouseButton.LeftButton)
    assert tab.job.running and not tab.run_btn.isEnabled() and tab.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: tab.job.state != "running", timeout=240_000)
    assert tab.job.state == "done", tab.status.text()

    files = list(tmp_path.rglob("*.h5"))
    assert [f.name for f in files] == ["cmu_small_region.h5"]
    emb = load_embeddings(files[0])
    session = dock.store.active
    assert embedded_signals == [session] and session.n_tiles == len(emb)
    np.testing.assert_array_equal(session.features, emb.features)
    # coverage: one pixel per grid cell, 2 on every embedded tile, nothing elsewhere
    cov = ov.find(viewer, ov.COVERAGE, session)
    assert cov.name == f"gpfm: coverage ({slide.name})"
    assert ov.info(cov)["slide_id"] == slide.metadata["slide_id"] == session.key
    assert ov.info(cov)["encoder"] == "tiny-vit" and ov.info(cov)["tiling"]["tile_px"] == 112
    assert cov.data.shape == session.grid_shape
    assert np.all(cov.data[session.grid_rc[:, 0], session.grid_rc[:, 1]] == 2)
    assert int((cov.data == 2).sum()) == session.n_tiles
    assert tab.coverage_refreshes >= 2  # grid + batches (+ final)
    assert tab.run_btn.isEnabled() and not tab.cancel_btn.isEnabled()

    # second run: the cached file is reused (no rewrite, no batch), same layer object
    mtime = files[0].stat().st_mtime_ns
    before = tab.coverage_refreshes
    qtbot.mouseClick(tab.run_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tab.job.state != "running", timeout=120_000)
    assert tab.job.state == "done"
    assert files[0].stat().st_mtime_ns == mtime
    assert tab.coverage_refreshes == before + 1  # only the final paint
    assert tab.last_reused is True and "reused" in tab.status.text()
    assert ov.layers_of(viewer, session.key, ("coverage",)) == [cov]


def test_cancel_keeps_partial_coverage_and_writes_no_file(
    make_napari_viewer: Any, qtbot: Any, cmu_svs: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    slide = open_slide_layer(viewer, cmu_svs)
    dock = make_dock(viewer, tmp_path, batch_size=2)
    tab = dock.embed_tab
    tab.run()
    # press Cancel as soon as the first batch reached the main thread
    qtbot.waitUntil(lambda: tab.progress.value() > 0, timeout=240_000)
    qtbot.mouseClick(tab.cancel_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tab.job.state != "running", timeout=60_000)
    assert tab.job.state == "cancelled"
    assert not list(tmp_path.rglob("*.h5")) and not list(tmp_path.rglob(".*.tmp"))
    assert tab.run_btn.isEnabled() and not tab.cancel_btn.isEnabled()
    assert "cancelled" in tab.status.text()
    cov = ov.find(viewer, ov.COVERAGE, slide_id=slide.metadata["slide_id"]).data
    done, todo = int((cov == 2).sum()), int((cov == 1).sum())
    assert done > 0 and todo > 0  # partial coverage kept on screen
    assert len(dock.store) == 0


def test_bad_input_gives_one_line(
    make_napari_viewer: Any, notes: Any, he_png: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    dock = make_dock(viewer, tmp_path)
    assert dock.embed_tab.run(sync=True) is None  # no slide open
    open_slide_layer(viewer, he_png)  # a PNG without µm/px
    dock.embed_tab.refresh_slides()
    assert dock.embed_tab.run(sync=True) is None
    dock.embed_tab.encoder_combo.setCurrentText("no-such-encoder")
    msgs = [m for m in notes() if "slide" in m or "µm/px" in m]
    assert any("no slide chosen" in m for m in msgs)
    assert any("µm/px" in m for m in msgs)
    assert all("\n" not in m for m in notes())
    assert not list(tmp_path.rglob("*.h5"))


def test_unknown_encoder_is_one_notification(embedded: Any, notes: Any, tmp_path: Path) -> None:
    _, dock, _ = embedded
    dock.embed_tab.set_out_dir(tmp_path)
    dock.embed_tab.encoder_combo.setCurrentText("no-such-encoder")
    assert dock.embed_tab.run(sync=True) is None
    assert dock.embed_tab.job.state == "error"
    errors = [m for m in notes() if "no-such-encoder" in m]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert dock.embed_tab.run_btn.isEnabled()


def grid_layer_coords(layer: Any) -> np.ndarray:
    """(N, 2) int64 level-0 ``(x, y)`` top-left corners of a tile-grid Shapes layer's rectangles."""
    return np.array(
        [np.asarray(d).min(axis=0)[::-1] for d in layer.data], dtype=np.int64
    ).reshape(-1, 2)


def test_embedding_uses_the_edited_tissue_layer_and_the_grid_follows(
    make_napari_viewer: Any, qtbot: Any, cmu_svs: Path, tmp_path: Path
) -> None:
    """An edited tissue layer is what the dock embeds, and the grid layer shows that grid."""
    from gpfm_core.tiling import make_tile_grid
    from napari_gpfm._layers import tissue_from_layer
    from napari_gpfm._reader import slide_for_layer

    viewer = make_napari_viewer()
    slide_layer = open_slide_layer(viewer, cmu_svs)
    sid = slide_layer.metadata["slide_id"]
    slide = slide_for_layer(slide_layer)
    dock = make_dock(viewer, tmp_path)
    _tissue, shown = dock.embed_tab.show_tissue(sync=True)
    layer = ov.find(viewer, ov.TISSUE, slide_id=sid)
    grid_layer = ov.find(viewer, ov.TILE_GRID, slide_id=sid)
    np.testing.assert_array_equal(grid_layer_coords(grid_layer), shown.coords)
    # the user keeps only a 700 x 500 px rectangle of tissue (level-0 (y, x) vertices)
    layer.data = [np.array([[1200.0, 800.0], [1200.0, 1500.0], [1700.0, 1500.0], [1700.0, 800.0]])]
    layer.features = {"kind": np.array(["tissue"], dtype=object)}
    expected = make_tile_grid(slide, mpp=0.5, tile_px=112, tissue=tissue_from_layer(layer, slide))
    assert 0 < len(expected) < len(shown) // 4
    # the grid layer follows the edit (debounced)
    qtbot.waitUntil(
        lambda: ov.info(ov.find(viewer, ov.TILE_GRID, slide_id=sid))["n_tiles"] == len(expected),
        timeout=10_000,
    )
    session = dock.embed_tab.run(sync=True)
    assert session is not None
    np.testing.assert_array_equal(session.coords, expected.coords)
    shown_now = grid_layer_coords(ov.find(viewer, ov.TILE_GRID, slide_id=sid))
    np.testing.assert_array_equal(shown_now, session.coords)

    # another tile size: the grid shown follows it, and is again what is embedded
    dock.embed_tab.tile_spin.setValue(80)
    finer = make_tile_grid(slide, mpp=0.5, tile_px=80, tissue=tissue_from_layer(layer, slide))
    assert len(finer) != len(expected)
    qtbot.waitUntil(
        lambda: ov.info(ov.find(viewer, ov.TILE_GRID, slide_id=sid))["n_tiles"] == len(finer),
        timeout=10_000,
    )
    session = dock.embed_tab.run(sync=True)
    shown_now = grid_layer_coords(ov.find(viewer, ov.TILE_GRID, slide_id=sid))
    np.testing.assert_array_equal(shown_now, finer.coords)
    np.testing.assert_array_equal(session.coords, finer.coords)


def _cmu_dock(make_viewer: Any, cmu_svs: Path, out: Path) -> tuple[Any, Any, str, GpfmDock]:
    """``(viewer, slide layer, slide id, dock)`` with the CMU sample open."""
    viewer = make_viewer()
    slide = open_slide_layer(viewer, cmu_svs)
    return viewer, slide, slide.metadata["slide_id"], make_dock(viewer, out)


def test_tissue_button_adds_editable_layers_in_a_worker(
    make_napari_viewer: Any, qtbot: Any, cmu_svs: Path, tmp_path: Path
) -> None:
    viewer, slide, sid, dock = _cmu_dock(make_napari_viewer, cmu_svs, tmp_path)
    qtbot.mouseClick(dock.embed_tab.tissue_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: ov.find(viewer, ov.TILE_GRID, slide_id=sid) is not None, timeout=60_000)
    tissue = ov.find(viewer, ov.TISSUE, slide_id=sid)
    assert tissue.name == f"gpfm: tissue ({slide.name})" and len(tissue.data) >= 1
    _tissue, grid = dock.embed_tab.show_tissue(sync=True)  # same result on the blocking path
    grid_layer = ov.find(viewer, ov.TILE_GRID, slide_id=sid)
    assert len(grid_layer.data) == len(grid) > 20
    assert len(ov.layers_of(viewer, sid, ("tissue", "tile_grid"))) == 2  # replaced, not added


def test_keep_ink_shows_the_ink_changes_the_tissue_and_keys_the_cache(
    make_napari_viewer: Any, qtbot: Any, cmu_svs: Path, tmp_path: Path
) -> None:
    """The CMU sample carries green marking dye at the right edge of its tissue."""
    from gpfm_core.embed.loading import read_attrs

    viewer, slide, sid, dock = _cmu_dock(make_napari_viewer, cmu_svs, tmp_path)
    tab = dock.embed_tab
    tissue, grid = tab.show_tissue(sync=True)
    assert tissue.params["exclude_ink"] is True and tissue.ink.any()
    ink = ov.find(viewer, ov.INK, slide_id=sid)
    assert ink.name == f"gpfm: ink ({slide.name})"
    assert ov.info(ink) == {"slide_id": sid, "kind": "ink", "fraction": float(tissue.ink.mean())}
    np.testing.assert_array_equal(ink.data > 0, tissue.ink)
    # each mask pixel covers its level-0 box [c * dx, (c + 1) * dx) on the slide
    (dx, dy), (r, c) = tissue.downsample, np.argwhere(tissue.ink)[0]
    got = [ink.data_to_world([r - 0.5, c - 0.5]), ink.data_to_world([r + 0.5, c + 0.5])]
    want = [slide.data_to_world([r * dy - 0.5, c * dx - 0.5]),
            slide.data_to_world([(r + 1) * dy - 0.5, (c + 1) * dx - 0.5])]  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert not (tissue.mask & tissue.ink).any()  # left out of the tissue

    # "keep ink": detected again (unedited tissue), the dye is tissue and its tiles flagged
    before = ov.find(viewer, ov.TISSUE, slide_id=sid)
    tab.ink_check.setChecked(True)
    qtbot.waitUntil(lambda: ov.find(viewer, ov.TISSUE, slide_id=sid) is not before, timeout=60_000)
    kept, kept_grid = tab.show_tissue(sync=True)
    assert kept.params["exclude_ink"] is False and (kept.mask & kept.ink).any()
    assert kept_grid.ink_fraction.sum() > grid.ink_fraction.sum()
    session = tab.run(sync=True)
    assert session is not None and tab.last_reused is False
    np.testing.assert_array_equal(session.coords, kept_grid.coords)  # the grid shown
    emb = load_embeddings(session.embeddings_path)
    np.testing.assert_allclose(emb.ink_fraction, kept_grid.ink_fraction)
    assert '"exclude_ink": false' in read_attrs(session.embeddings_path)["tissue_params"]

    # an edited mask keeps the ink found: the file still flags the inked tiles
    layer = ov.find(viewer, ov.TISSUE, slide_id=sid)
    layer.feature_defaults = {"kind": "tissue"}
    layer.add_rectangles(np.array([[[0.0, 0.0], [300.0, 300.0]]]))  # tissue drawn on glass
    edited = tab.run(sync=True)
    assert edited is not None and any(x < 300 and y < 300 for x, y in edited.coords)
    flags = load_embeddings(edited.embeddings_path).ink_fraction
    np.testing.assert_allclose(flags, kept.ink_fractions(edited.coords, edited.tile_size), atol=1e-6)
    assert flags.max() > 0

    # unticked again (on the detected tissue): the file made with ink kept is not reused
    tab.show_tissue(sync=True)
    before = ov.find(viewer, ov.TISSUE, slide_id=sid)
    tab.ink_check.setChecked(False)
    qtbot.waitUntil(lambda: ov.find(viewer, ov.TISSUE, slide_id=sid) is not before, timeout=60_000)
    again = tab.run(sync=True)
    assert again is not None and tab.last_reused is False
    np.testing.assert_array_equal(again.coords, grid.coords)
    assert '"exclude_ink": true' in read_attrs(again.embeddings_path)["tissue_params"]
