"""One analysis overlay at a time per slide, the toggle key, and cancelling clustering."""

from __future__ import annotations

from typing import Any

import numpy as np
from _dock_support import click, tile_rect, tile_world_centre
from napari.utils.key_bindings import KeyBinding
from qtpy.QtCore import Qt

from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._dock import TOGGLE_KEY
from napari_gpfm._widget._session import SlideSession

pytest_plugins = ["_dock_support"]

_ANALYSIS = {"coverage", "clusters", "similarity", "prediction", "confidence", "tile_grid"}


def _shown(viewer: Any, session: SlideSession) -> set[str]:
    """Kinds of the slide's analysis overlays that are visible."""
    return {
        ov.info(layer)["kind"]
        for layer in ov.layers_of(viewer, session.key, _ANALYSIS)
        if layer.visible
    }


def _press_toggle(viewer: Any) -> None:
    viewer.keymap[KeyBinding.from_str(TOGGLE_KEY)](viewer)


def test_each_result_shows_alone_tabs_switch_and_the_key_toggles(embedded: Any) -> None:
    viewer, dock, session = embedded
    dock.embed_tab.show_tissue(sync=True)  # the grid is an overlay too
    assert _shown(viewer, session) == {"coverage", "tile_grid"}

    # each tab's result shows alone on the slide
    dock.tabs.setCurrentWidget(dock.explore_tab)
    dock.explore_tab.k_spin.setValue(4)
    assert dock.explore_tab.run(sync=True)
    assert _shown(viewer, session) == {"clusters"}
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    click(viewer, tile_world_centre(session, 5))
    assert _shown(viewer, session) == {"similarity"}
    dock.tabs.setCurrentWidget(dock.probe_tab)
    tab = dock.probe_tab
    tab.auto_check.setChecked(False)
    shapes, _ = tab.ensure_layers()
    rows = session.grid_rc[:, 0]
    tab.classes.set_current(0)
    shapes.add_rectangles(tile_rect(session, np.flatnonzero(rows <= np.quantile(rows, 0.2))))
    tab.classes.set_current(1)
    shapes.add_rectangles(tile_rect(session, np.flatnonzero(rows >= np.quantile(rows, 0.8))))
    assert tab.train(sync=True)
    assert _shown(viewer, session) == {"prediction"}
    assert shapes.visible  # annotations are not an analysis overlay

    # opening a tab shows its overlay alone
    dock.tabs.setCurrentWidget(dock.explore_tab)
    assert _shown(viewer, session) == {"clusters"}
    dock.tabs.setCurrentWidget(dock.embed_tab)
    assert _shown(viewer, session) == {"coverage"}

    # the user may turn any overlay back on: the dock leaves it so
    ov.find(viewer, ov.SIMILARITY, session).visible = True
    assert _shown(viewer, session) == {"coverage", "similarity"}

    # the key toggles the current tab's overlay: off, then on alone
    dock.tabs.setCurrentWidget(dock.explore_tab)
    clusters = ov.find(viewer, ov.CLUSTERS, session)
    _press_toggle(viewer)
    assert not clusters.visible and _shown(viewer, session) == set()
    ov.find(viewer, ov.PREDICTION, session).visible = True
    _press_toggle(viewer)
    assert _shown(viewer, session) == {"clusters"}
    assert dock.toggle_overlay() is False and dock.toggle_overlay() is True


def test_cancel_stops_clustering_inside_the_umap_layout(embedded: Any, qtbot: Any) -> None:
    """Cancel pressed while UMAP lays out: the job ends cancelled before the last epoch."""
    viewer, dock, _cmu = embedded
    rng = np.random.default_rng(0)
    n = 4000  # umap-learn's 500 layout epochs take seconds here, a poll 0.1 s
    cols = 80
    grid_rc = np.stack([np.arange(n) // cols, np.arange(n) % cols], axis=1)
    session = SlideSession(
        key="many", name="many tiles", slide_path=None,
        features=rng.standard_normal((n, 32)).astype(np.float32), coords=grid_rc[:, ::-1] * 100,
        grid_rc=grid_rc, grid_shape=(n // cols, cols), stride=100, tile_size=100, mpp=(0.5, 0.5),
    )  # fmt: skip
    dock.set_active(session)
    tab = dock.explore_tab
    dock.tabs.setCurrentWidget(tab)
    qtbot.mouseClick(tab.run_btn, Qt.MouseButton.LeftButton)
    assert tab.job.running
    qtbot.waitUntil(lambda: "optimise" in tab.status.text(), timeout=300_000)
    qtbot.mouseClick(tab.cancel_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tab.job.state != "running", timeout=60_000)
    assert tab.job.state == "cancelled"
    epochs = session.cache["umap_epochs"]
    assert 0 <= epochs < 500, epochs  # stopped inside the layout
    assert session.umap is None and session.clusters is None
    assert ov.find(viewer, ov.CLUSTERS, session) is None
    assert tab.run_btn.isEnabled() and "cancelled" in tab.status.text()
