"""``napari-gpfm demo``: layers in a real viewer, and a headless screenshot via the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from napari_gpfm._demo import build_demo
from napari_gpfm._layers import GRID_LAYER, TISSUE_LAYER


def test_build_demo_fills_viewer(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    state = build_demo(viewer, out_dir=tmp_path / "out")
    names = [layer.name for layer in viewer.layers]
    assert names == ["cmu_small_region", TISSUE_LAYER, GRID_LAYER]
    assert state.slide_layer.multiscale and not state.slide.closed
    assert len(state.grid) > 20 and len(state.grid_layer.data) == len(state.grid)
    assert len(state.tissue_layer.data) >= len(state.tissue.polygons) >= 1
    assert (tmp_path / "out").is_dir()
    assert viewer.scale_bar.visible
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
    # the slide's white glass, H&E-stained tissue (pink/purple) and the yellow grid are there
    white = (img > 235).all(axis=2).mean()
    pink = ((img[..., 0] > 120) & (img[..., 1] < 110) & (img[..., 2] > 100)).mean()
    yellow = ((img[..., 0] > 200) & (img[..., 1] > 170) & (img[..., 2] < 60)).mean()
    assert white > 0.03 and pink > 0.01 and yellow > 0.0005, (white, pink, yellow)


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
