"""Shared helpers and fixtures of the dock tests (imported by tests/napari/test_dock_*.py).

The CMU sample is embedded once per test session with the real ``tiny-vit`` encoder
(0.5 µm/px, 112 px tiles: 218 tissue tiles) into a session temp folder; every dock then
reuses that file through its own Embed tab (the cache path of the real pipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from napari.utils._test_utils import read_only_mouse_event
from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

from napari_gpfm._widget import GpfmDock
from napari_gpfm._widget._session import SlideSession

ENCODER = "tiny-vit"
MPP = 0.5
TILE_PX = 112
_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def cmu_embeddings(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    """Folder holding the CMU sample's tiny-vit embeddings (made once per session)."""
    if "cmu" not in _CACHE:
        from gpfm_core.embed import embed_slide

        out = tmp_path_factory.mktemp("dock-emb")
        embed_slide(cmu_svs, encoder=ENCODER, out_dir=out, mpp=MPP, tile_px=TILE_PX, device="cpu")
        _CACHE["cmu"] = out
    return _CACHE["cmu"]


@pytest.fixture(scope="session")
def mirror_png(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    """The CMU sample mirrored left-right: a PNG of the same size and µm/px (0.499, as dpi)."""
    from PIL import Image

    from gpfm_core.slide import open_slide

    with open_slide(cmu_svs) as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = slide.mpp[0]
    path = tmp_path_factory.mktemp("mirror") / "cmu_mirror.png"
    dpi = 25400.0 / mpp
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(path, dpi=(dpi, dpi))
    return path


def open_slide_layer(viewer: Any, path: Path) -> Any:
    """Open ``path`` with the napari-gpfm reader; returns the slide layer."""
    layers = viewer.open(str(path), plugin="napari-gpfm")
    assert len(layers) == 1
    return layers[0]


def make_dock(viewer: Any, out_dir: Path, *, batch_size: int = 64) -> GpfmDock:
    """A dock in ``viewer`` set to tiny-vit, 0.5 µm/px, 112 px tiles, ``out_dir``."""
    dock = GpfmDock(viewer)
    viewer.window.add_dock_widget(dock, name="GPFM")
    tab = dock.embed_tab
    tab.encoder_combo.setCurrentText(ENCODER)
    tab.mpp_spin.setValue(MPP)
    tab.tile_spin.setValue(TILE_PX)
    tab.device_combo.setCurrentText("cpu")
    tab.batch_spin.setValue(batch_size)
    tab.set_out_dir(out_dir)
    return dock


def embed_in_dock(dock: GpfmDock, layer_name: str) -> SlideSession:
    """Pick slide layer ``layer_name`` in the Embed tab and embed it (blocking)."""
    tab = dock.embed_tab
    tab.refresh_slides()
    tab.slide_combo.setCurrentText(layer_name)
    session = tab.run(sync=True)
    assert session is not None, tab.status.text()
    return session


def tile_rect(session: SlideSession, indices: np.ndarray) -> np.ndarray:
    """Napari (row, col) rectangle in level-0 px around the centres of tiles ``indices``."""
    c = session.tile_centers()[indices]
    (x0, y0), (x1, y1) = c.min(axis=0) - 5, c.max(axis=0) + 5
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])


@pytest.fixture
def embedded(
    make_napari_viewer: Any, cmu_svs: Path, cmu_embeddings: Path
) -> tuple[Any, GpfmDock, SlideSession]:
    """(viewer, dock, session): the CMU slide open and embedded (from the cache) in a dock."""
    viewer = make_napari_viewer()
    open_slide_layer(viewer, cmu_svs)
    dock = make_dock(viewer, cmu_embeddings)
    session = dock.embed_tab.run(sync=True)
    assert session is not None and session.n_tiles > 100
    return viewer, dock, session


def world_of(session: SlideSession, x: float, y: float) -> tuple[float, float]:
    """World ``(row, col)`` µm of level-0 pixel-centre ``(x, y)`` (slide at scale mpp)."""
    return y * session.mpp[1], x * session.mpp[0]


def tile_world_centre(session: SlideSession, index: int) -> tuple[float, float]:
    """World ``(row, col)`` of tile ``index``'s centre."""
    return world_of(session, *session.tile_center(index))


def click(
    viewer: Any, position: tuple[float, float], *, drag_to: tuple[float, float] | None = None
) -> None:
    """Press and release the left button at world ``position`` (optionally dragging)."""
    press = read_only_mouse_event(type="mouse_press", button=1, position=position, pos=np.zeros(2))
    mouse_press_callbacks(viewer, press)
    if drag_to is not None:
        from napari.utils.interactions import mouse_move_callbacks

        move = read_only_mouse_event(
            type="mouse_move",
            is_dragging=True,
            button=1,
            position=drag_to,
            pos=np.array([40.0, 40.0]),
        )
        mouse_move_callbacks(viewer, move)
    end = drag_to if drag_to is not None else position
    release = read_only_mouse_event(
        type="mouse_release",
        button=1,
        position=end,
        pos=np.array([40.0, 40.0]) if drag_to else np.zeros(2),
    )
    mouse_release_callbacks(viewer, release)


def unit(features: np.ndarray) -> np.ndarray:
    """Row-normalised float64 copy (independent reference for cosine checks)."""
    f = features.astype(np.float64)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def open_cohort_hit(qtbot: Any, viewer: Any, dock: GpfmDock, *, not_on: str) -> tuple[Any, Any]:
    """Click the Retrieve gallery's best cohort hit on a slide other than ``not_on`` and
    check what a click on a cohort hit does: its slide opened once through the reader, its
    session loaded from the cohort's feature file, the view centred on the tile, and its
    similarity heatmap shown, the hit's score being its value there. Returns (hit, session).
    """
    from napari.layers import Image
    from qtpy.QtCore import Qt

    from napari_gpfm._layers import viewer_camera
    from napari_gpfm._widget import _overlays as ov

    tab = dock.retrieve_tab
    i, hit = next((i, h) for i, h in enumerate(tab.hits) if h.key != not_on)
    n_layers = len(viewer.layers)
    qtbot.mouseClick(tab.gallery.buttons[i], Qt.MouseButton.LeftButton)
    opened = [lay for lay in viewer.layers if lay.metadata.get("path") == hit.slide_path]
    assert len(opened) == 1 and isinstance(opened[0], Image) and len(viewer.layers) > n_layers
    other = dock.store.get(hit.key)
    assert other is not None and other.embeddings_path == Path(hit.file)
    np.testing.assert_allclose(
        viewer_camera(viewer).center[-2:], tile_world_centre(other, hit.index), atol=1e-6
    )
    heat = ov.find(viewer, ov.SIMILARITY, other)
    assert heat is not None and heat.visible
    value = heat.data[other.grid_rc[hit.index, 0], other.grid_rc[hit.index, 1]]
    assert abs(value - hit.score) < 3e-3  # the gallery's score is its value on the heatmap
    return hit, other
