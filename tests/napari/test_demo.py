"""``napari-gpfm demo``: layers in a real viewer, and a headless screenshot via the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from napari_gpfm._demo import build_demo, scale_bar
from napari_gpfm._layers import GRID_LAYER, TISSUE_LAYER, viewer_camera
from napari_gpfm._widget import _overlays as ov


def test_build_demo_fills_viewer(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    state = build_demo(viewer, out_dir=tmp_path / "out")
    names = [layer.name for layer in viewer.layers]
    assert names == ["cmu_small_region", f"{TISSUE_LAYER} (cmu_small_region)", f"{GRID_LAYER} (cmu_small_region)"]
    sid = state.slide.slide_id
    assert ov.find(viewer, ov.TISSUE, slide_id=sid) is state.tissue_layer
    assert ov.find(viewer, ov.TILE_GRID, slide_id=sid) is state.grid_layer
    assert state.slide_layer.multiscale and not state.slide.closed
    assert len(state.grid) > 20 and len(state.grid_layer.data) == len(state.grid)
    assert len(state.tissue_layer.data) >= len(state.tissue.polygons) >= 1
    assert (tmp_path / "out").is_dir()
    assert scale_bar(viewer).visible
    viewer.layers.remove(state.slide_layer)
    assert state.slide.closed


def test_cli_demo_writes_a_real_screenshot(tmp_path: Path) -> None:
    shot = tmp_path / "demo.png"
    env = dict(os.environ)
    assert env.get("DISPLAY"), "pytest-xvfb provides DISPLAY"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_gpfm",
            "demo",
            "--out",
            str(tmp_path / "o"),
            "--screenshot",
            str(shot),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[0] >= 600 and img.shape[1] >= 900
    # the slide's white glass, H&E-stained tissue (pink/purple) and the similarity heatmap's
    # orange-to-yellow tiles (magma's upper half over tissue: ~0.008 of the window with the
    # heatmap shown alone, ~0.001 with it hidden) are there
    white = (img > 235).all(axis=2).mean()
    pink = ((img[..., 0] > 120) & (img[..., 1] < 110) & (img[..., 2] > 100)).mean()
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    warm = ((r > 190) & (g > 70) & (b < 140) & (r - b > 80)).mean()
    assert white > 0.03 and pink > 0.01 and warm > 0.003, (white, pink, warm)
    assert "tiles embedded by " in proc.stdout
    # the Slide model tab answered (the demo slide has no carcinoma: "low")
    assert "slide model carcinoma-share: Prediction: low" in proc.stdout


def test_cli_demo_offline_fails_with_one_line(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(
        GPFM_DATA_DIR=str(tmp_path),
        GPFM_SAMPLE_URL="http://127.0.0.1:9/x.svs",
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "napari_gpfm", "demo", "--screenshot", str(tmp_path / "x.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "GPFM_DATA_DIR" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_demo_overlays_land_on_their_tiles(make_napari_viewer, tmp_path: Path) -> None:
    """The demo's analysis state, rendered: each cluster colour sits exactly on its tile."""
    from napari_gpfm._demo import add_analysis_dock

    viewer = make_napari_viewer(show=True)
    state = build_demo(viewer, out_dir=tmp_path / "out")
    add_analysis_dock(viewer, state)
    session = state.extras["session"]
    names = {layer.name for layer in viewer.layers}
    assert {
        "gpfm: clusters (cmu_small_region)",
        "gpfm: similarity (cmu_small_region)",
        "gpfm: annotations (cmu_small_region)",
    } <= names
    assert session.clusters is not None and session.similarity is not None
    assert any((state.out_dir / "embeddings").rglob("*.h5"))
    # one overlay at a time: the Retrieve tab's similarity; the slide's others are hidden
    visible = {ov.info(layer).get("kind") for layer in viewer.layers if layer.visible}
    assert "similarity" in visible
    assert visible & {"clusters", "coverage", "prediction", "confidence", "tile_grid"} == set()

    clusters = ov.find(viewer, ov.CLUSTERS, session)
    for layer in viewer.layers:  # only the slide and the cluster overlay, fully opaque
        layer.visible = layer is state.slide_layer or layer is clusters
    clusters.opacity = 1.0
    mpp = state.slide.mpp[0]
    side_px = 80.0  # a tile is drawn 80 screen px wide
    viewer_camera(viewer).zoom = side_px / (session.stride * mpp)
    labels = np.asarray(clusters.data)
    checked = 0
    for index in np.linspace(0, session.n_tiles - 1, 4).astype(int):
        row, col = session.grid_rc[index]
        x, y = session.tile_center(int(index))
        viewer_camera(viewer).center = tuple(state.slide_layer.data_to_world([y, x]))
        shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
        h, w = shot.shape[:2]
        expected = np.round(np.asarray(clusters.colormap.map(labels[row, col]))[:3] * 255)
        match = np.abs(shot - expected).max(axis=2) <= 3
        assert match[h // 2, w // 2], "the tile centre does not show its cluster colour"
        # the colour runs half a tile from the centre to the tile's left and top edges,
        # unless the neighbour there has the same cluster (then the edge is invisible)
        if not (col > 0 and labels[row, col - 1] == labels[row, col]):
            assert abs(_run(match[h // 2], w // 2, -1) - side_px / 2) <= 3, index
        if not (row > 0 and labels[row - 1, col] == labels[row, col]):
            assert abs(_run(match[:, w // 2], h // 2, -1) - side_px / 2) <= 3, index
        checked += 1
    assert checked == 4


def _run(line: np.ndarray, start: int, step: int) -> int:
    """Length of the run of True in ``line`` from ``start`` going ``step`` (inclusive)."""
    n = 0
    i = start
    while 0 <= i < len(line) and line[i]:
        n += 1
        i += step
    return n
