"""Explore tab: UMAP + clusters on the slide, scatter <-> slide linking, pixel placement."""

from __future__ import annotations

from typing import Any

import numpy as np
from _dock_support import click, tile_world_centre, world_of
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QEvent, QPointF, Qt
from qtpy.QtGui import QMouseEvent
from qtpy.QtWidgets import QApplication

from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._explore_tab import HDBSCAN

pytest_plugins = ["_dock_support"]


def _mouse(widget: Any, kind: QEvent.Type, xy: tuple[float, float], buttons: Any) -> None:
    pos = QPointF(*xy)
    glob = QPointF(widget.mapToGlobal(pos.toPoint()))
    button = Qt.MouseButton.LeftButton if kind != QEvent.Type.MouseMove else Qt.MouseButton.NoButton
    ev = QMouseEvent(kind, pos, glob, button, buttons, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, ev)


def _lasso(widget: Any, polygon: np.ndarray) -> None:
    left = Qt.MouseButton.LeftButton
    _mouse(widget, QEvent.Type.MouseButtonPress, tuple(polygon[0]), left)
    for xy in polygon[1:]:
        _mouse(widget, QEvent.Type.MouseMove, tuple(xy), left)
    _mouse(widget, QEvent.Type.MouseButtonRelease, tuple(polygon[-1]), Qt.MouseButton.NoButton)


def test_cluster_button_scatter_and_slide_are_linked(embedded: Any, qtbot: Any) -> None:
    viewer, dock, session = embedded
    tab = dock.explore_tab
    dock.tabs.setCurrentWidget(tab)
    tab.k_spin.setValue(5)
    qtbot.mouseClick(tab.run_btn, Qt.MouseButton.LeftButton)  # the real threaded path
    assert tab.job.running
    qtbot.waitUntil(lambda: tab.job.state != "running", timeout=400_000)
    assert tab.job.state == "done", tab.status.text()

    clusters = ov.find(viewer, ov.CLUSTERS, session)
    assert isinstance(clusters, Labels) and isinstance(clusters.colormap, DirectLabelColormap)
    assert clusters.data.shape == session.grid_shape
    rc = session.grid_rc
    np.testing.assert_array_equal(clusters.data[rc[:, 0], rc[:, 1]], session.clusters)
    assert set(np.unique(session.clusters)) == {1, 2, 3, 4, 5}
    assert int((clusters.data > 0).sum()) == session.n_tiles
    assert session.umap.shape == (session.n_tiles, 2)
    assert tab.scatter.n_points == session.n_tiles
    tiles = ov.find(viewer, ov.TILES, session)
    assert len(tiles.data) == session.n_tiles
    np.testing.assert_array_equal(tiles.features["cluster"], session.clusters)
    np.testing.assert_allclose(tiles.features["umap_x"], session.umap[:, 0])

    # hovering: the clusters layer is active, so napari's status shows the cluster number
    assert viewer.layers.selection.active is clusters
    hover = clusters.get_status(tile_world_centre(session, 4), world=True)
    assert hover["coordinates"].endswith(f": {session.clusters[4]}")

    # click a tile on the slide: its point lights up, the cluster is selected, no colormap rebuild
    cmap_events: list[Any] = []
    clusters.events.colormap.connect(cmap_events.append)
    for index in (0, session.n_tiles // 2, session.n_tiles - 1):
        click(viewer, tile_world_centre(session, index))
        assert list(tab.scatter.selected) == [index]
        assert clusters.selected_label == session.clusters[index]
        assert f"tile {index}: cluster {session.clusters[index]}" in tab.status.text()
    assert cmap_events == []
    assert clusters.colormap is not None and ov.find(viewer, ov.CLUSTERS, session) is clusters

    # a drag (pan) is not a click
    click(viewer, tile_world_centre(session, 1), drag_to=tile_world_centre(session, 2))
    assert list(tab.scatter.selected) == [session.n_tiles - 1]

    # click outside the tissue: a status message only
    click(viewer, world_of(session, -500.0, -500.0))
    assert "No embedded tile" in tab.status.text()
    assert tab.scatter.selected.size == 0

    # lasso in the scatter with real mouse events -> exactly those tiles on gpfm: selection
    # the lasso is the quadrant about the median point that holds the most points (a UMAP
    # layout may leave any fixed quadrant empty)
    px = tab.scatter.to_pixels()
    lo, hi = px.min(axis=0), px.max(axis=0)
    mid = np.median(px, axis=0) + 0.5  # between pixel centres, never on a point
    quads = [(sx, sy) for sx in (-1, 1) for sy in (-1, 1)]
    counts = [
        int(np.sum((sx * (px[:, 0] - mid[0]) > 0) & (sy * (px[:, 1] - mid[1]) > 0)))
        for sx, sy in quads
    ]
    sx, sy = quads[int(np.argmax(counts))]
    far = np.array([hi[0] + 2 if sx > 0 else lo[0] - 2, hi[1] + 2 if sy > 0 else lo[1] - 2])
    poly = np.array([far, [mid[0], far[1]], mid, [far[0], mid[1]], far])
    _lasso(tab.scatter, poly)
    inside = (sx * (px[:, 0] - mid[0]) > 0) & (sy * (px[:, 1] - mid[1]) > 0)
    expected = np.flatnonzero(inside)
    assert expected.size > 0
    np.testing.assert_array_equal(tab.scatter.selected, expected)
    sel = ov.find(viewer, ov.SELECTION, session).data
    assert int(sel.sum()) == expected.size
    assert np.all(sel[rc[expected, 0], rc[expected, 1]] == 1)

    # box mode
    tab.mode_combo.setCurrentText("box")
    _lasso(tab.scatter, np.array([[lo[0] - 1, lo[1] - 1], mid, [hi[0] + 1, hi[1] + 1]]))
    assert tab.scatter.selected.size == session.n_tiles

    # density clustering (UMAP is cached): the colormap is set once for the new clustering
    tab.method_combo.setCurrentText(HDBSCAN)
    assert not tab.k_spin.isEnabled()
    assert tab.run(sync=True)
    assert len(cmap_events) == 1
    assert session.clusters.min() >= 0 and session.clusters.max() >= 1
    np.testing.assert_array_equal(clusters.data[rc[:, 0], rc[:, 1]], session.clusters)


def test_tile_layers_are_pixel_exact_on_the_slide(embedded: Any) -> None:
    viewer, dock, session = embedded
    dock.explore_tab.run(sync=True)
    dock.retrieve_tab.query_tile(session, 3, thumbnails=False)
    expected = session.similarity_index().query_tiles(3)
    np.testing.assert_allclose(ov.find(viewer, ov.TILES, session).features["similarity"], expected)
    slide = viewer.layers[session.name]
    t = session.tile_size
    layers = [ov.find(viewer, n, session) for n in (ov.COVERAGE, ov.CLUSTERS, ov.SIMILARITY)]
    assert isinstance(layers[2], Image)
    for layer in layers:
        for index in (0, 7, session.n_tiles - 1):
            (r, c), (x0, y0) = session.grid_rc[index], session.coords[index]
            # centre of the tile pixel == centre of the tile's level-0 region
            centre = layer.data_to_world((r, c))
            np.testing.assert_allclose(
                centre, slide.data_to_world((y0 + (t - 1) / 2, x0 + (t - 1) / 2))
            )
            # extent: pixel edges == outer edges of the tile's first and last level-0 pixels
            np.testing.assert_allclose(
                layer.data_to_world((r - 0.5, c - 0.5)), slide.data_to_world((y0 - 0.5, x0 - 0.5))
            )
            np.testing.assert_allclose(
                layer.data_to_world((r + 0.5, c + 0.5)),
                slide.data_to_world((y0 + t - 0.5, x0 + t - 0.5)),
            )
        assert tuple(layer.units) == tuple(slide.units)
