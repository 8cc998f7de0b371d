"""Retrieve tab: click -> centred-cosine heatmap in place, query outline, top-k gallery over every
embedded slide."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from _dock_support import click, open_slide_layer, tile_world_centre, unit, world_of
from napari.layers import Image
from qtpy.QtCore import Qt

from napari_gpfm._layers import viewer_camera
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._demo_hook import populate_demo
from napari_gpfm._widget._retrieve_tab import QUERY, query_layer

pytest_plugins = ["_dock_support"]


def centred_unit(features: np.ndarray) -> np.ndarray:
    """Rows centred on their mean, then normalised (float64 reference of the dock's scores)."""
    return unit(features - features.astype(np.float64).mean(axis=0))


def test_click_query_heatmap_gallery_and_navigation(
    embedded: Any, qtbot: Any, small_pyramid: Path
) -> None:
    viewer, dock, cmu = embedded
    # a second embedded slide: retrieval searches both
    open_slide_layer(viewer, small_pyramid)
    dock.embed_tab.refresh_slides()
    dock.embed_tab.slide_combo.setCurrentText(small_pyramid.stem)
    other = dock.embed_tab.run(sync=True)
    assert other is not None and other.key != cmu.key and len(dock.store) == 2
    dock.set_active(cmu)
    tab = dock.retrieve_tab
    dock.tabs.setCurrentWidget(tab)
    tab.k_spin.setValue(9)

    query = cmu.n_tiles // 3
    click(viewer, tile_world_centre(cmu, query))
    sim = ov.find(viewer, ov.SIMILARITY, cmu)
    assert isinstance(sim, Image) and sim.opacity == 0.6 and sim.data.shape == cmu.grid_shape
    # centred cosine: each slide's features centred on its own mean, then normalised
    cu, cu_other = centred_unit(cmu.features), centred_unit(other.features)
    q = cu[query]
    expected = cu @ q
    rc = cmu.grid_rc
    np.testing.assert_allclose(sim.data[rc[:, 0], rc[:, 1]], expected, atol=1e-5)
    assert abs(sim.data[rc[query, 0], rc[query, 1]] - 1.0) < 1e-5
    # the contrast spreads the slide's own range: 2nd percentile to the best tile but the query
    rest = np.delete(expected, query)
    np.testing.assert_allclose(sim.contrast_limits, [np.percentile(rest, 2), rest.max()], atol=1e-5)
    assert expected.min() < 0 < rest.max() < 1  # readable: unlike tissue scores below zero
    # the query tile is outlined on the slide
    marker, slide = viewer.layers[ov.layer_name(QUERY, cmu.name)], viewer.layers[cmu.name]
    assert query_layer(viewer) is marker
    # in the slide's units (µm), as every layer: napari then keeps its scale bar in µm
    assert marker.units == slide.units

    def outline_on_slide() -> np.ndarray:  # the outline's corners in slide pixel coordinates
        corners = np.asarray(marker.data[0])[[0, 2]]
        return np.array([slide.world_to_data(marker.data_to_world(c))[-2:] for c in corners])

    (x0, y0), t = cmu.coords[query], cmu.tile_size
    expected_outline = [[y0 - 0.5, x0 - 0.5], [y0 + t - 0.5, x0 + t - 0.5]]
    np.testing.assert_allclose(outline_on_slide(), expected_outline, atol=1e-3)
    assert marker.metadata["gpfm"] == {"kind": "query", **cmu.provenance()}

    # top-k over both slides, query excluded, best first. Compared by score, not by rank: two
    # tiles closer than float32 rounding (the app) vs float64 (this reference) may swap places
    expected_other = cu_other @ q
    ref = {(cmu.key, i): s for i, s in enumerate(expected) if i != query}
    ref |= {(other.key, i): s for i, s in enumerate(expected_other)}
    got = [ref[(h.key, h.index)] for h in tab.hits]  # KeyError: the query itself came back
    assert len(set(tab.hits)) == 9 and {h.key for h in tab.hits} <= {cmu.key, other.key}
    np.testing.assert_allclose(got, sorted(ref.values(), reverse=True)[:9], atol=1e-5)
    assert all(a >= b - 1e-5 for a, b in itertools.pairwise(got))
    np.testing.assert_allclose([h.score for h in tab.hits], got, atol=1e-5)
    assert tab.searched == [cmu.key, other.key]
    assert f"Searched: {cmu.name}, {other.name}" in tab.status.text()
    assert len(tab.gallery.buttons) == 9
    qtbot.waitUntil(lambda: len(tab.gallery.thumbnails_shown) == 9, timeout=60_000)
    assert all(not b.isHidden() and "\n" in b.text() for b in tab.gallery.buttons)

    # a second click updates the same layer and the same array in place
    data_id = id(sim.data)
    click(viewer, tile_world_centre(cmu, 0))
    assert ov.find(viewer, ov.SIMILARITY, cmu) is sim and id(sim.data) == data_id
    assert abs(sim.data[rc[0, 0], rc[0, 1]] - 1.0) < 1e-5
    assert tab.last_timing["total_ms"] > 0
    qtbot.waitUntil(lambda: not tab.thumbs.running, timeout=60_000)

    # clicking a gallery tile centres the view on it
    hit = tab.hits[0]
    qtbot.mouseClick(tab.gallery.buttons[0], Qt.MouseButton.LeftButton)
    target = dock.store.get(hit.key)
    np.testing.assert_allclose(
        viewer_camera(viewer).center[-2:], tile_world_centre(target, hit.index)
    )

    # neighbourhood averaging: mean of the unit features of the 3x3 neighbours
    tab.neigh_check.setChecked(True)
    click(viewer, tile_world_centre(cmu, query))
    near = np.flatnonzero(np.abs(rc - rc[query]).max(axis=1) <= 1)
    assert near.size > 1
    qn = cu[near].mean(axis=0)
    np.testing.assert_allclose(
        sim.data[rc[:, 0], rc[:, 1]], cu @ (qn / np.linalg.norm(qn)), atol=1e-5
    )
    assert len(marker.data) == 1  # one outline around the neighbourhood
    lo, hi = cmu.coords[near].min(axis=0), cmu.coords[near].max(axis=0) + t
    np.testing.assert_allclose(
        outline_on_slide(), [[lo[1] - 0.5, lo[0] - 0.5], [hi[1] - 0.5, hi[0] - 0.5]], atol=1e-3
    )

    # outside the embedded tiles: status message only, heatmap unchanged
    before = sim.data.copy()
    click(viewer, world_of(cmu, -300.0, 10.0))
    assert "No embedded tile" in tab.status.text()
    np.testing.assert_array_equal(sim.data, before)

    # a query on the other slide moves the one outline there, renamed and re-tagged
    tab.query_tile(other, 0, thumbnails=False)
    assert query_layer(viewer) is marker and marker.name == ov.layer_name(QUERY, other.name)
    assert marker.metadata["gpfm"] == {"kind": "query", **other.provenance()}
    assert sum(ov.info(layer).get("kind") == "query" for layer in viewer.layers) == 1
    tab.query_tile(cmu, query, thumbnails=False)
    assert marker.name == ov.layer_name(QUERY, cmu.name)

    # disarmed: clicks do nothing
    tab.arm_btn.setChecked(False)
    click(viewer, tile_world_centre(cmu, 0))
    np.testing.assert_array_equal(sim.data, before)
    qtbot.waitUntil(lambda: not tab.thumbs.running, timeout=60_000)


def test_populate_demo_fills_every_tab(embedded: Any, cmu_embeddings: Path) -> None:
    viewer, dock, cmu = embedded
    x, y = cmu.tile_center(5)
    session = populate_demo(
        viewer, dock, query_xy=(x, y), out_dir=cmu_embeddings, encoder="tiny-vit", k=4
    )
    assert session.n_tiles == cmu.n_tiles
    kinds = {ov.info(lay).get("kind") for lay in ov.layers_of(viewer, session.key)}
    assert {
        "clusters",
        "similarity",
        "coverage",
        "tiles",
        "annotations",
        "annotation_points",
    } <= kinds
    # one overlay at a time: the Retrieve tab's similarity is the one shown
    shown = {ov.info(lay)["kind"] for lay in ov.layers_of(viewer, session.key) if lay.visible}
    assert shown & {"clusters", "coverage", "prediction", "confidence"} == set()
    assert "similarity" in shown
    assert session.query_index == 5 and session.clusters.max() == 4
    assert dock.tabs.currentWidget() is dock.retrieve_tab and len(dock.retrieve_tab.hits) == 12
    assert dock.probe_tab.session is session


def test_gallery_shows_long_slide_names_whole(qtbot: Any) -> None:
    from napari_gpfm._widget._gallery import Hit, TileGallery

    gallery = TileGallery()
    qtbot.addWidget(gallery)
    names = ["TCGA-A1-A0SB-01Z-00-DX1.B34C267B.svs", "TCGA-A1-A0SB-01Z-00-DX2.91C2A8F1.svs"]
    gallery.set_hits([Hit("a", names[0], 3, 0.91234), Hit("b", names[1], 7, 0.5)])
    texts = [b.text().split("\n")[1] for b in gallery.buttons]
    # shortened in the middle: both the study prefix and the distinguishing end stay visible
    assert all(t.startswith("TCGA") and t.endswith("svs") and "…" in t for t in texts)
    assert texts[0] != texts[1]
    assert gallery.buttons[0].toolTip().startswith(names[0] + "\n")  # the whole name
    assert "similarity 0.9123" in gallery.buttons[0].toolTip()
