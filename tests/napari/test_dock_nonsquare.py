"""A slide with non-square pixels through the whole dock: every overlay on its tiles, square in µm.

The ``nonsquare_tif`` fixture is the CMU sample stretched 2x along x (0.2495 x 0.499 µm
pixels). At 0.5 µm/px and 112 px a tile is 224 x 112 level-0 px: one square of 55.9 µm. The
slide is embedded, clustered, queried and probed through the widgets; each overlay's raster
pixel must cover exactly its tile's level-0 pixels on the slide layer, and the exports must
write the true tile boxes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dock_support import (
    click,
    embed_in_dock,
    make_dock,
    open_slide_layer,
    tile_rect,
    tile_world_centre,
)

from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._retrieve_tab import QUERY, query_layer
from napari_gpfm._widget._session import SlideSession

pytest_plugins = ["_dock_support"]

TX, TY = 224, 112  # level-0 px of one 112-px tile at 0.5 µm/px: 224 * 0.2495 = 112 * 0.499 µm
SIDE_UM = TX * 0.2495


def _assert_on_tiles(layer: Any, slide: Any, session: SlideSession, tiles: np.ndarray) -> None:
    """Raster pixel of each tile covers exactly the tile's level-0 pixels; a square in µm."""
    assert np.asarray(layer.scale)[-2:] == pytest.approx((SIDE_UM, SIDE_UM))
    for i in tiles:
        (x, y), (r, c) = session.coords[i], session.grid_rc[i]
        got = [layer.data_to_world([r - 0.5, c - 0.5]), layer.data_to_world([r + 0.5, c + 0.5])]
        want = [
            slide.data_to_world([y - 0.5, x - 0.5]),
            slide.data_to_world([y + TY - 0.5, x + TX - 0.5]),
        ]
        np.testing.assert_allclose(got, want, atol=1e-9)


def test_every_overlay_of_a_nonsquare_slide_lands_on_its_tiles(
    make_napari_viewer: Any, nonsquare_tif: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    slide = open_slide_layer(viewer, nonsquare_tif)
    dock = make_dock(viewer, tmp_path)
    session = embed_in_dock(dock, slide.name)
    assert session.mpp == pytest.approx((0.2495, 0.499))
    assert session.tile_size_xy == (TX, TY) and session.stride_xy == (TX, TY)
    n = session.n_tiles
    tiles = np.unique([0, n // 3, n // 2, n - 1])

    _assert_on_tiles(ov.find(viewer, ov.COVERAGE, session), slide, session, tiles)

    dock.tabs.setCurrentWidget(dock.explore_tab)
    dock.explore_tab.k_spin.setValue(3)
    assert dock.explore_tab.run(sync=True)
    clusters = ov.find(viewer, ov.CLUSTERS, session)
    _assert_on_tiles(clusters, slide, session, tiles)
    rc = session.grid_rc
    np.testing.assert_array_equal(clusters.data[rc[:, 0], rc[:, 1]], session.clusters)

    # a click at a tile's centre (world = level-0 x * 0.2495, y * 0.499) queries that tile
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    query = int(tiles[1])
    click(viewer, tile_world_centre(session, query))
    assert session.query_index == query
    _assert_on_tiles(ov.find(viewer, ov.SIMILARITY, session), slide, session, tiles)
    marker = viewer.layers[ov.layer_name(QUERY, session.name)]
    assert query_layer(viewer) is marker
    corners = np.asarray(marker.data[0])[[0, 2]]
    outline = [slide.world_to_data(marker.data_to_world(p))[-2:] for p in corners]
    (x0, y0) = session.coords[query]
    np.testing.assert_allclose(
        outline, [[y0 - 0.5, x0 - 0.5], [y0 + TY - 0.5, x0 + TX - 0.5]], atol=1e-3
    )
    world = np.array([marker.data_to_world(p) for p in corners])
    assert np.ptp(world, axis=0) == pytest.approx((SIDE_UM, SIDE_UM), abs=1e-3)  # a square

    # probe: two bands of tiles, labelled by their true (224 x 112) boxes
    tab = dock.probe_tab
    dock.tabs.setCurrentWidget(tab)
    tab.auto_check.setChecked(False)
    shapes, _ = tab.ensure_layers()
    rows = session.grid_rc[:, 0]
    bands = [
        np.flatnonzero(rows <= np.quantile(rows, 0.2)),
        np.flatnonzero(rows >= np.quantile(rows, 0.8)),
    ]
    want = {}
    centres = session.tile_centers()
    for cls, band in enumerate(bands):
        tab.classes.set_current(cls)
        rect = tile_rect(session, band)
        shapes.add_rectangles(rect)
        (ylo, xlo), (yhi, xhi) = rect.min(axis=0), rect.max(axis=0)
        inside = (
            (centres[:, 0] >= xlo)
            & (centres[:, 0] <= xhi)
            & (centres[:, 1] >= ylo)
            & (centres[:, 1] <= yhi)
        )
        want[tab.classes.names[cls]] = int(inside.sum())
    assert tab.train(sync=True)
    assert tab.report.n_per_class == want
    _assert_on_tiles(ov.find(viewer, ov.PREDICTION, session), slide, session, tiles)
    _assert_on_tiles(ov.find(viewer, ov.CONFIDENCE, session), slide, session, tiles)

    # exports: the true boxes, not squares of the x size
    fc = json.loads(tab.export_geojson(tmp_path / "out.geojson").read_text())
    det = [f for f in fc["features"] if f["properties"]["objectType"] == "detection"]
    rings = sorted(tuple(map(tuple, f["geometry"]["coordinates"][0])) for f in det)
    boxes = sorted(
        ((x, y), (x + TX, y), (x + TX, y + TY), (x, y + TY), (x, y))
        for x, y in session.coords.tolist()
    )
    assert rings == boxes
    with open(tab.export_csv(tmp_path / "tiles.csv")) as fh:
        table = list(csv.DictReader(fh))
    assert {(r["width"], r["height"]) for r in table} == {(str(TX), str(TY))}
    assert [[int(r["x"]), int(r["y"])] for r in table] == session.coords.tolist()
