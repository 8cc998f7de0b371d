"""Feature files made elsewhere (CLAM, TRIDENT) in the dock: overlays on the tiles they name.

The files are written as those tools write them (``tests/_foreign_h5.py``) for tiles of the
real CMU sample, and loaded through the Embed tab's "Load features…". CLAM starts each tissue
contour's grid at the contour's own bounding box, so a file with two contours has tiles on
two lattices that no one raster holds: the dock draws each overlay tile by tile from the
coordinates and the tile size, and every box must cover exactly its tile's level-0 pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dock_support import click, make_dock, open_slide_layer, tile_rect, tile_world_centre
from napari.layers import Labels, Shapes

from _foreign_h5 import clam_contour, write_clam_features, write_clam_patches, write_trident
from gpfm_core.errors import GpfmError
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._session import SlideSession

pytest_plugins = ["_dock_support"]

T = 224  # CLAM's patch_size at patch_level 0 (downsample 1): 224 level-0 px, step 224


def _two_contours(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A CLAM run on the CMU sample: contour b's grid starts 77 px right, 80 px down of a's.

    Returns the feature file (``h5_files/``, beside ``patches/``), the coords and which tile
    belongs to contour a. Features: contour a near +2, contour b near -2 (two clusters).
    """
    a = clam_contour((150, 100), (4 * T, 6 * T), T)  # 24 tiles
    b = clam_contour((150 + 4 * T + 77, 100 + 80), (3 * T, 5 * T), T)  # 15 tiles
    patches = tmp_path / "patches" / "cmu_small_region.h5"
    patches.parent.mkdir()
    coords = write_clam_patches(
        patches, [a, b], patch_size=T, patch_level=0, downsample=(1.0, 1.0), level_dim=(2220, 2967)
    )
    in_a = np.arange(len(coords)) < len(a)
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((len(coords), 8)).astype(np.float32) * 0.3
    feats[:, 0] += np.where(in_a, 2.0, -2.0)
    path = tmp_path / "h5_files" / "cmu_small_region.h5"
    path.parent.mkdir()
    write_clam_features(path, coords, features=feats)
    return path, coords, in_a


def _assert_boxes_on_tiles(layer: Any, slide: Any, session: SlideSession) -> None:
    """Each box of a box-by-box overlay covers exactly its tile's level-0 pixels."""
    assert isinstance(layer, Shapes) and len(layer.data) == session.n_tiles
    for i, verts in enumerate(layer.data):
        x, y = session.coords[i]
        lo = layer.data_to_world(np.asarray(verts).min(axis=0))
        hi = layer.data_to_world(np.asarray(verts).max(axis=0))
        want = [
            slide.data_to_world([y - 0.5, x - 0.5]),
            slide.data_to_world([y + T - 0.5, x + T - 0.5]),
        ]
        np.testing.assert_allclose([lo, hi], want, atol=1e-9)


def test_clam_file_with_two_contours_draws_every_overlay_on_its_tiles(
    make_napari_viewer: Any, cmu_svs: Path, tmp_path: Path, notes: Any
) -> None:
    viewer = make_napari_viewer()
    slide = open_slide_layer(viewer, cmu_svs)
    dock = make_dock(viewer, tmp_path / "cache")
    path, coords, in_a = _two_contours(tmp_path)

    session = dock.embed_tab.load_features(path)  # finds patches/ beside h5_files/
    assert dock.store.active is session and session.n_tiles == len(coords)
    np.testing.assert_array_equal(session.coords, coords)
    assert session.tile_size_xy == (T, T) and not session.exact
    assert any("several grids" in m and "tile by tile" in m for m in notes())

    coverage = ov.find(viewer, ov.COVERAGE, session)
    _assert_boxes_on_tiles(coverage, slide, session)

    # clusters: the two contours, each tile's box in its cluster's colour
    dock.tabs.setCurrentWidget(dock.explore_tab)
    dock.explore_tab.k_spin.setValue(2)
    assert dock.explore_tab.run(sync=True)
    assert {
        tuple(np.unique(session.clusters[in_a])),
        tuple(np.unique(session.clusters[~in_a])),
    } == {(1,), (2,)}
    clusters = ov.find(viewer, ov.CLUSTERS, session)
    _assert_boxes_on_tiles(clusters, slide, session)
    colours = dock.explore_tab.cluster_colors(session)
    np.testing.assert_allclose(clusters.face_color, colours[session.clusters - 1], atol=1e-6)

    # a click on a tile of contour b (off contour a's lattice) queries that very tile
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    query = int(np.flatnonzero(~in_a)[4])
    click(viewer, tile_world_centre(session, query))
    assert session.query_index == query
    sim = ov.find(viewer, ov.SIMILARITY, session)
    _assert_boxes_on_tiles(sim, slide, session)
    lo, _hi = sim.metadata["gpfm_contrast_limits"]
    alpha = np.asarray(sim.face_color)[:, 3]
    np.testing.assert_array_equal(alpha > 0, session.similarity > lo)  # below the range: clear
    assert alpha[query] == 1.0 and (alpha[~in_a] > 0).all()  # its own contour lights up

    # probe: contour a against contour b; each box in its predicted class's colour
    tab = dock.probe_tab
    dock.tabs.setCurrentWidget(tab)
    tab.auto_check.setChecked(False)
    shapes, _ = tab.ensure_layers()
    for cls, sel in enumerate((in_a, ~in_a)):
        tab.classes.set_current(cls)
        shapes.add_rectangles(tile_rect(session, np.flatnonzero(sel)))
    assert tab.train(sync=True)
    assert tab.report.n_per_class == {"tumour": int(in_a.sum()), "stroma": int((~in_a).sum())}
    pred = ov.find(viewer, ov.PREDICTION, session)
    _assert_boxes_on_tiles(pred, slide, session)
    np.testing.assert_array_equal(session.prediction, np.where(in_a, 0, 1))
    np.testing.assert_allclose(pred.face_color, tab.classes.rgba()[session.prediction], atol=1e-6)


def test_trident_file_places_tiles_on_its_raster_and_bad_files_say_one_line(
    make_napari_viewer: Any, cmu_svs: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    slide = open_slide_layer(viewer, cmu_svs)
    dock = make_dock(viewer, tmp_path / "cache")
    # TRIDENT at 20x on a 20x slide (CMU: 0.499 µm/px): 224-px tiles from (0, 0), some dropped
    rr, cc = np.meshgrid(np.arange(3, 9), np.arange(1, 7), indexing="ij")
    coords = np.stack([cc.ravel() * T, rr.ravel() * T], axis=1)[::2]
    path = tmp_path / "features_uni_v1" / "cmu_small_region.h5"
    path.parent.mkdir()
    write_trident(path, coords, patch_size=T, src_mag=20, target_mag=20, level0=(2220, 2967))
    session = dock.embed_tab.load_features(path)
    assert session.exact and session.encoder == "uni_v1" and session.origin == (0, 0)
    coverage = ov.find(viewer, ov.COVERAGE, session)
    assert isinstance(coverage, Labels)  # one raster places every tile exactly
    for i in (0, len(coords) - 1):
        (x, y), (r, c) = coords[i], session.grid_rc[i]
        got = [
            coverage.data_to_world([r - 0.5, c - 0.5]),
            coverage.data_to_world([r + 0.5, c + 0.5]),
        ]
        want = [
            slide.data_to_world([y - 0.5, x - 0.5]),
            slide.data_to_world([y + T - 0.5, x + T - 0.5]),
        ]
        np.testing.assert_allclose(got, want, atol=1e-9)

    n_layers = len(viewer.layers)
    other = tmp_path / "other.h5"  # a TRIDENT file of a 40000 x 30000 slide
    write_trident(other, coords, patch_size=T, src_mag=20, target_mag=20)
    with pytest.raises(GpfmError, match="40000x30000 px slide") as err:
        dock.embed_tab.load_features(other)
    assert "\n" not in str(err.value)
    lone = tmp_path / "lone" / "h5_files" / "one.h5"  # CLAM features, one tile, no patching file
    lone.parent.mkdir(parents=True)
    write_clam_features(lone, coords[:1])
    with pytest.raises(GpfmError, match="cannot be known") as err:
        dock.embed_tab.load_features(lone)
    assert "\n" not in str(err.value) and "patching file" in str(err.value)
    assert len(viewer.layers) == n_layers and len(dock.store) == 1  # nothing half-loaded
