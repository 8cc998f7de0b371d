"""Shared fixtures: the real sample slides from ``GPFM_DATA_DIR`` and generated pyramids."""

from __future__ import annotations

import os
from pathlib import Path

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
