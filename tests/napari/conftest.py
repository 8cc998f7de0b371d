"""Fixtures for the napari plugin tests: broken slide files and notification capture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def notes() -> Callable[[], list[str]]:
    """Messages of the napari notifications emitted since the test started."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    def messages() -> list[str]:
        return [str(n.message) for n in notification_manager.records[start:]]

    return messages


@pytest.fixture(scope="session")
def bad_slides(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> dict[str, Path]:
    """Files a user may drop on napari that are not readable slides.

    Keys: ``missing``, ``folder``, ``text_svs`` (text renamed .svs), ``empty_svs``
    (0 bytes), ``truncated_svs`` (first MB of CMU-1-Small-Region.svs), ``unsupported``
    (a ``.xyz`` file), ``garbage_tif`` (random bytes as .tif).
    """
    d = tmp_path_factory.mktemp("bad")
    (d / "folder.svs").mkdir()
    (d / "notes.svs").write_text("patient 12, H&E, see report\n" * 20)
    (d / "empty.svs").write_bytes(b"")
    (d / "truncated.svs").write_bytes(cmu_svs.read_bytes()[: 1 << 20])
    (d / "scan.xyz").write_bytes(b"\x00" * 1000)
    rng = np.random.default_rng(0)
    (d / "garbage.tif").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {
        "missing": d / "does_not_exist.svs",
        "folder": d / "folder.svs",
        "text_svs": d / "notes.svs",
        "empty_svs": d / "empty.svs",
        "truncated_svs": d / "truncated.svs",
        "unsupported": d / "scan.xyz",
        "garbage_tif": d / "garbage.tif",
    }


@pytest.fixture(scope="session")
def blank_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1200×900 white PNG with faint noise at 0.5 µm/px (50,800 dpi): a slide with no tissue."""
    from PIL import Image

    rng = np.random.default_rng(1)
    arr = (250 + rng.integers(0, 5, (900, 1200, 3))).astype(np.uint8)
    path = tmp_path_factory.mktemp("blank") / "blank.png"
    Image.fromarray(arr).save(path, dpi=(50800, 50800))
    return path


@pytest.fixture(scope="session")
def small_pyramid(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 4096×3072 synthetic pyramidal TIFF (native levels, 256 px tiles, 0.25 µm/px)."""
    from gpfm_core.synth import make_synthetic_slide

    path = tmp_path_factory.mktemp("pyr") / "synthetic.tiff"
    return make_synthetic_slide(
        path, width=4096, height=3072, mpp=0.25, tile=256, sources=[data_dir / "he_patch_1000.png"]
    )
