"""Shared fixtures: the real sample slides from ``GPFM_DATA_DIR`` and generated pyramids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def _data_dir() -> Path:
    raw = os.environ.get("GPFM_DATA_DIR")
    if not raw:
        pytest.fail("GPFM_DATA_DIR is not set: point it at ../shared/data (make test does)")
    path = Path(raw)
    if not path.is_dir():
        pytest.fail(f"GPFM_DATA_DIR={raw} is not a folder")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding the sample images (``GPFM_DATA_DIR``)."""
    return _data_dir()


@pytest.fixture(scope="session")
def cmu_svs(data_dir: Path) -> Path:
    """OpenSlide's public CMU-1-Small-Region.svs (2220×2967, 0.499 µm/px, one level)."""
    path = data_dir / "cmu_small_region.svs"
    if not path.is_file():
        pytest.fail(f"{path} missing: the sample slide must lie in GPFM_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def he_png(data_dir: Path) -> Path:
    """A 1000×1000 H&E carcinoma PNG (no µm/px metadata)."""
    path = data_dir / "he_patch_1000.png"
    if not path.is_file():
        pytest.fail(f"{path} missing: the sample image must lie in GPFM_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def small_pyramid(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A generated 4096×3072 Aperio-style pyramidal TIFF (0.25 µm/px, levels 1/2/4/8)."""
    from gpfm_core.synth import make_synthetic_slide

    out = tmp_path_factory.mktemp("pyramid") / "small_pyramid.svs"
    return make_synthetic_slide(
        out,
        width=4096,
        height=3072,
        mpp=0.25,
        tile=512,
        sources=[data_dir / "cmu_small_region.svs", data_dir / "he_patch_1000.png"],
        seed=1,
    )


@pytest.fixture(scope="session")
def cmu_rgb(cmu_svs: Path):
    """The whole CMU level 0 as one ``(2967, 2220, 3)`` uint8 array."""
    from gpfm_core.slide import open_slide

    with open_slide(cmu_svs) as s:
        return s.read_region((0, 0), 0, s.dimensions)


@pytest.fixture(scope="session")
def padded_twins(tmp_path_factory: pytest.TempPathFactory, cmu_rgb) -> dict[str, Path]:
    """The CMU sample as a 1/2/4/8 pyramid with 256-px tiles, with and without padding.

    ``twin``: unpadded Aperio-style; ``padded``: the same with every coarse level padded
    to whole tiles in black (OpenSlide reports downsamples 1.833, 3.377, 5.065), no
    resolution tags; ``padded_tags``: generic TIFF padded in white, with per-level
    resolution tags.
    """
    from gpfm_core.synth import write_pyramid_tiff

    d = tmp_path_factory.mktemp("padded")
    kw = {"mpp": 0.499, "tile": 256}
    return {
        "twin": write_pyramid_tiff(d / "twin.svs", cmu_rgb, **kw),
        "padded": write_pyramid_tiff(d / "padded.svs", cmu_rgb, pad_to_tiles=True, **kw),
        "padded_tags": write_pyramid_tiff(
            d / "padded_tags.tif",
            cmu_rgb,
            pad_to_tiles=True,
            pad_value=255,
            style="generic",
            level_resolution=True,
            **kw,
        ),
    }


@pytest.fixture(scope="session")
def nonsquare_tif(tmp_path_factory: pytest.TempPathFactory, cmu_rgb) -> Path:
    """The CMU sample stretched 2x along x: a 4440×2967 slide of 0.2495 × 0.499 µm pixels.

    Each level-0 pixel of the sample (0.499 µm square) becomes two pixels side by side, so
    physical position ``(x, y)`` µm is at sample pixel ``(x, y) / 0.499`` and at pixel
    ``(2 x, y) / 0.499`` here. Generic TIFF with resolution tags, levels 1/2/4.
    """
    from PIL import Image

    from gpfm_core.synth import write_pyramid_tiff

    h, w = cmu_rgb.shape[:2]
    wide = np.asarray(Image.fromarray(cmu_rgb).resize((2 * w, h), Image.Resampling.NEAREST))
    out = tmp_path_factory.mktemp("nonsquare") / "nonsquare.tif"
    return write_pyramid_tiff(
        out,
        wide,
        mpp=(0.2495, 0.499),
        factors=(1, 2, 4),
        style="generic",
        level_resolution=True,
    )
