"""The grid shown is the grid embedded; a slide without µm/px gets it from the dock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dock_support import make_dock, open_slide_layer
from qtpy.QtCore import Qt

from gpfm_core.embed.loading import read_attrs
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid
from napari_gpfm._widget import _overlays as ov

pytest_plugins = ["_dock_support"]

#: (source, crop (x, y, w, h), µm/px written as dpi, tile px at 0.5 µm/px): odd sizes, several
#: µm/px and tile sizes. Laid on the tissue layer's polygons rasterised again (what the dock
#: embedded before), rows 0, 4, 5 and 6 gain or lose a tile or shift one.
IMAGES = [
    ("cmu", (700, 900, 701, 563), 0.499, 96),
    ("cmu", (400, 1200, 997, 811), 0.5, 112),
    ("cmu", (1000, 600, 613, 1231), 0.37, 64),
    ("cmu", (300, 1800, 1333, 717), 0.499, 112),
    ("cmu", (900, 1500, 889, 889), 0.45, 64),
    ("cmu", (200, 1000, 1201, 605), 0.25, 48),
    ("cmu", (1500, 400, 455, 999), 0.499, 48),
    ("cmu", (600, 1700, 1111, 1013), 0.33, 96),
    ("he", (0, 0, 999, 999), 0.5, 112),
    ("he", (100, 50, 641, 877), 0.29, 64),
    ("he", (150, 400, 823, 547), 0.499, 96),
    ("he", (300, 200, 517, 733), 0.41, 48),
]


def _write_crop(src: Path, box: tuple[int, int, int, int], mpp: float, out: Path) -> Path:
    from PIL import Image

    x, y, w, h = box
    with open_slide(src, mpp=1.0) as slide:  # the PNG source has no µm/px; only pixels are read
        rgb = slide.read_region((x, y), 0, (w, h))
    dpi = 25400.0 / mpp
    Image.fromarray(rgb).save(out, dpi=(dpi, dpi))
    return out


def _grid_coords(layer: Any) -> np.ndarray:
    return np.array([np.asarray(d).min(axis=0)[::-1] for d in layer.data], np.int64).reshape(-1, 2)


@pytest.mark.parametrize(
    ("source", "box", "mpp", "tile_px"), IMAGES, ids=[f"{s}-{b[2]}x{b[3]}-{t}px" for s, b, _, t in IMAGES]
)
def test_grid_shown_is_the_grid_embedded_and_the_file_is_reused(
    make_napari_viewer: Any, cmu_svs: Path, he_png: Path, tmp_path: Path,
    source: str, box: tuple[int, int, int, int], mpp: float, tile_px: int,
) -> None:  # fmt: skip
    path = _write_crop(cmu_svs if source == "cmu" else he_png, box, mpp, tmp_path / "crop.png")
    viewer = make_napari_viewer()
    layer = open_slide_layer(viewer, path)
    dock = make_dock(viewer, tmp_path / "emb")
    tab = dock.embed_tab
    tab.tile_spin.setValue(tile_px)
    first = tab.run(sync=True)  # a plain embed: tissue detected by the pipeline
    assert first is not None and first.n_tiles > 0 and tab.last_reused is False
    h5 = first.embeddings_path
    mtime = h5.stat().st_mtime_ns

    _tissue, grid = tab.show_tissue(sync=True)
    shown = _grid_coords(ov.find(viewer, ov.TILE_GRID, slide_id=layer.metadata["slide_id"]))
    np.testing.assert_array_equal(shown, grid.coords)
    np.testing.assert_array_equal(shown, first.coords)  # shown == embedded, tile for tile
    np.testing.assert_array_equal(grid.grid_rc, first.grid_rc)

    again = tab.run(sync=True)  # after Tissue + grid, unedited: the same file is reused
    assert again is not None and tab.last_reused is True
    assert again.embeddings_path == h5 and h5.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.coords, shown)


def test_slide_without_mpp_is_tiled_with_the_value_entered(
    make_napari_viewer: Any, qtbot: Any, notes: Any, he_png: Path, cmu_svs: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    png = open_slide_layer(viewer, he_png)  # a PNG without µm/px
    sid = png.metadata["slide_id"]
    dock = make_dock(viewer, tmp_path)
    tab = dock.embed_tab
    spin = tab.slide_mpp_spin
    assert spin.value() == 0.0 and spin.text().startswith("unknown")
    assert tab.run(sync=True) is None
    assert any("'Slide µm/px' field" in m for m in notes())

    # the user types 0.5 and presses Enter
    spin.lineEdit().selectAll()
    qtbot.keyClicks(spin, "0.5")
    qtbot.keyClick(spin, Qt.Key.Key_Return)
    assert tab.slide_mpp == {sid: 0.5}
    np.testing.assert_allclose(png.scale, [0.5, 0.5])
    assert tuple(str(u) for u in png.units) == ("micrometer", "micrometer")

    # tiling, layers and the session use it
    _tissue, grid = tab.show_tissue(sync=True)
    with open_slide(he_png, mpp=0.5) as slide:
        expected = make_tile_grid(slide, mpp=0.5, tile_px=112)
    np.testing.assert_array_equal(grid.coords, expected.coords)
    np.testing.assert_allclose(ov.find(viewer, ov.TILE_GRID, slide_id=sid).scale, [0.5, 0.5])
    session = tab.run(sync=True)
    assert session is not None and session.mpp == (0.5, 0.5)
    np.testing.assert_array_equal(session.coords, expected.coords)
    attrs = read_attrs(session.embeddings_path)
    assert attrs["slide_mpp_x"] == pytest.approx(0.5) and attrs["slide_mpp_override"] == "0.5,0.5"
    np.testing.assert_allclose(ov.find(viewer, ov.COVERAGE, session).scale, [0.5 * 112] * 2)

    # remembered per slide
    cmu = open_slide_layer(viewer, cmu_svs)
    tab.refresh_slides()
    tab.slide_combo.setCurrentText(cmu.name)
    assert spin.value() == pytest.approx(0.499)
    tab.slide_combo.setCurrentText(png.name)
    assert spin.value() == pytest.approx(0.5)

    # another value: the slide and its tissue rescale, its tiles and session are dropped
    tissue = ov.find(viewer, ov.TISSUE, slide_id=sid)
    tab.set_slide_mpp(0.25)
    np.testing.assert_allclose(png.scale, [0.25, 0.25])
    np.testing.assert_allclose(tissue.scale, [0.25, 0.25])
    assert dock.store.get(sid) is None
    assert ov.layers_of(viewer, sid, ("coverage", "tile_grid")) == []
    session = tab.run(sync=True)
    assert session is not None and session.mpp == (0.25, 0.25) and session.tile_size == 224
