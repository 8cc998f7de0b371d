"""Create or update the dock's stable-name layers in place.

Every tile-resolution layer (one pixel per tile) is placed on the slide with
:func:`gpfm_core.analysis.raster.tile_layer_placement` (``scale = stride * mpp``,
``translate = ((stride - 1) / 2 + origin) * mpp`` in ``(row, col)`` order) plus the slide
layer's own translate, so each pixel covers exactly its tile's level-0 region. Layers are
looked up by name and updated (data / colormap / placement); they are added only once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer, Points, Shapes
from napari.utils.colormaps import Colormap, DirectLabelColormap, ensure_colormap

from gpfm_core.analysis import tile_layer_placement
from napari_gpfm._widget._session import SlideSession

log = logging.getLogger(__name__)

CLUSTERS = "gpfm: clusters"
SIMILARITY = "gpfm: similarity"
PREDICTION = "gpfm: prediction"
CONFIDENCE = "gpfm: confidence"
ANNOTATIONS = "gpfm: annotations"
ANNOTATION_POINTS = "gpfm: annotation points"
COVERAGE = "gpfm: coverage"
TILES = "gpfm: tiles"
SELECTION = "gpfm: selection"

#: Qualitative palette (Tableau 20 order, saturated first) for clusters and classes.
PALETTE_HEX = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip


def palette(n: int) -> np.ndarray:
    """(n, 4) float32 RGBA colours, cycling the 20-colour palette."""
    rgb = [tuple(int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)) for h in PALETTE_HEX]
    return np.array([(*rgb[i % len(rgb)], 1.0) for i in range(n)], dtype=np.float32)


def label_colormap(colors: np.ndarray) -> DirectLabelColormap:
    """Label ``i + 1`` -> ``colors[i]``; 0 (no tile) and unknown labels transparent."""
    mapping: dict[int | None, Any] = {None: np.zeros(4, np.float32), 0: np.zeros(4, np.float32)}
    for i, c in enumerate(np.asarray(colors, dtype=np.float32)):
        mapping[i + 1] = c
    return DirectLabelColormap(color_dict=mapping)


def transparent_low(name: str) -> Colormap:
    """napari colormap ``name`` whose lowest entry is transparent (cells without a tile)."""
    base = ensure_colormap(name)
    colors = np.array(base.colors, dtype=np.float32)
    colors[0, 3] = 0.0
    return Colormap(colors=colors, controls=base.controls, name=f"{name} (gpfm)")


def placement(
    session: SlideSession, slide_layer: Layer | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """napari ``(scale, translate)`` (row, col) of a tile raster of ``session``."""
    ox, oy = session.origin
    extra = (session.tile_size - session.stride) / 2.0  # centre pixels on overlapping tiles
    scale, translate = tile_layer_placement(
        stride_level0=session.stride, mpp=session.mpp, origin_level0=(ox + extra, oy + extra)
    )
    if slide_layer is not None:
        translate = translate + np.asarray(slide_layer.translate, dtype=float)[-2:]
    return scale, translate


def slide_placement(
    session: SlideSession, slide_layer: Layer | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, translate)`` of a layer in level-0 pixel data units (Shapes, Points)."""
    scale = np.array([session.mpp[1], session.mpp[0]], dtype=float)
    translate = (
        np.zeros(2) if slide_layer is None else np.asarray(slide_layer.translate, float)[-2:]
    )
    return scale, translate


def _units(slide_layer: Layer | None) -> dict[str, Any]:
    """``units=`` of the slide layer (µm), so napari keeps one unit across layers."""
    return {} if slide_layer is None else {"units": tuple(str(u) for u in slide_layer.units)}


@contextlib.contextmanager
def keep_active(viewer: Any) -> Iterator[None]:
    """Restore the active layer after adding one (napari activates every new layer)."""
    before = viewer.layers.selection.active
    try:
        yield
    finally:
        if before is not None and before in viewer.layers:
            viewer.layers.selection.active = before


def find(viewer: Any, name: str) -> Layer | None:
    """The layer called ``name`` or None."""
    return viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 - LayerList has no .get


def _place(layer: Layer, scale: np.ndarray, translate: np.ndarray) -> None:
    if not np.allclose(layer.scale[-2:], scale) or not np.allclose(layer.translate[-2:], translate):
        layer.scale = scale
        layer.translate = translate


def set_raster(layer: Image | Labels, data: np.ndarray) -> None:
    """Replace ``layer``'s pixels in place (same array object when shapes match) and redraw."""
    old = layer.data
    if isinstance(old, np.ndarray) and old.shape == data.shape and old.dtype == data.dtype:
        if old is not data:
            old[...] = data
        layer.refresh()
    else:
        layer.data = data


def upsert_labels(
    viewer: Any,
    name: str,
    data: np.ndarray,
    session: SlideSession,
    slide_layer: Layer | None = None,
    *,
    colormap: DirectLabelColormap | None = None,
    opacity: float = 0.5,
) -> Labels:
    """Create the Labels layer ``name`` or update its data / placement / colormap in place."""
    scale, translate = placement(session, slide_layer)
    layer = find(viewer, name)
    if not isinstance(layer, Labels):
        if layer is not None:
            viewer.layers.remove(layer)
        with keep_active(viewer):
            layer = viewer.add_labels(
                data,
                name=name,
                scale=scale,
                translate=translate,
                opacity=opacity,
                **_units(slide_layer),
            )
        layer.editable = False
    else:
        _place(layer, scale, translate)
        set_raster(layer, data)
    if colormap is not None:
        layer.colormap = colormap
    return layer


def upsert_image(
    viewer: Any,
    name: str,
    data: np.ndarray,
    session: SlideSession,
    slide_layer: Layer | None = None,
    *,
    colormap: str = "magma",
    contrast_limits: tuple[float, float] = (0.0, 1.0),
    opacity: float = 0.6,
    contrast_range: tuple[float, float] = (0.0, 1.0),
    visible: bool = True,
) -> Image:
    """Create the Image layer ``name`` (lowest colour transparent) or update it in place.

    Contrast limits are set on creation and whenever the data change; colormap, opacity and
    the slider range (``contrast_range``, widened when needed) only on creation, so a user's
    choice survives the next update. Cells below the range (no tile) are transparent.
    """
    scale, translate = placement(session, slide_layer)
    layer = find(viewer, name)
    lo, hi = float(contrast_limits[0]), float(contrast_limits[1])
    if hi <= lo:
        hi = lo + 1e-3
    if not isinstance(layer, Image):
        if layer is not None:
            viewer.layers.remove(layer)
        with keep_active(viewer):
            layer = viewer.add_image(
                data,
                name=name,
                scale=scale,
                translate=translate,
                colormap=transparent_low(colormap),
                contrast_limits=(lo, hi),
                opacity=opacity,
                blending="translucent",
                interpolation2d="nearest",
                visible=visible,
                **_units(slide_layer),
            )
        layer.contrast_limits_range = contrast_range
    else:
        _place(layer, scale, translate)
        rlo, rhi = layer.contrast_limits_range
        if lo < rlo or hi > rhi:  # widen the slider range only when needed (one more refresh)
            layer.contrast_limits_range = (min(lo, rlo), max(hi, rhi))
        if tuple(layer.contrast_limits) != (lo, hi):
            layer.contrast_limits = (lo, hi)  # a shader uniform: no texture upload
        set_raster(layer, data)  # the one data refresh
    return layer


def upsert_tiles(
    viewer: Any, session: SlideSession, slide_layer: Layer | None, columns: dict[str, np.ndarray]
) -> Points:
    """The ``gpfm: tiles`` Points layer: tile centres with a ``features`` table.

    Parameters
    ----------
    columns
        Per-tile (N,) arrays merged into the table (e.g. ``cluster``, ``umap_x``, ``umap_y``,
        ``similarity``, ``prediction``, ``confidence``); the table always holds ``tile``,
        ``row``, ``col``, ``x``, ``y`` (level-0 centre).
    """
    import pandas as pd

    layer = find(viewer, TILES)
    same = (
        isinstance(layer, Points)
        and len(layer.data) == session.n_tiles
        and layer.metadata.get("gpfm_key") == session.key
    )
    if not same:
        centres = session.tile_centers()
        table = pd.DataFrame(
            {
                "tile": np.arange(session.n_tiles),
                "row": session.grid_rc[:, 0],
                "col": session.grid_rc[:, 1],
                "x": centres[:, 0],
                "y": centres[:, 1],
            }
        )
        scale, translate = slide_placement(session, slide_layer)
        if layer is not None:
            viewer.layers.remove(layer)
        with keep_active(viewer):
            layer = viewer.add_points(
                centres[:, ::-1],
                name=TILES,
                features=table,
                scale=scale,
                translate=translate,
                size=max(session.stride // 4, 1),
                face_color="white",
                visible=False,
                metadata={"gpfm_key": session.key},
                **_units(slide_layer),
            )
    assert isinstance(layer, Points)
    for key, values in columns.items():
        layer.features[key] = np.asarray(values)  # in place: no per-point redraw
    return layer


def upsert_shapes(
    viewer: Any, name: str, session: SlideSession, slide_layer: Layer | None
) -> Shapes:
    """The annotation Shapes layer (data in level-0 pixels), created once."""
    layer = find(viewer, name)
    if isinstance(layer, Shapes):
        return layer
    scale, translate = slide_placement(session, slide_layer)
    return viewer.add_shapes(
        name=name, scale=scale, translate=translate, edge_width=max(session.stride / 16, 2.0),
        face_color=[0, 0, 0, 0], features={"class": np.empty(0, dtype=int)}, ndim=2, **_units(slide_layer),
    )  # fmt: skip


def upsert_points(
    viewer: Any, name: str, session: SlideSession, slide_layer: Layer | None
) -> Points:
    """The annotation Points layer (data in level-0 pixels), created once."""
    layer = find(viewer, name)
    if isinstance(layer, Points):
        return layer
    scale, translate = slide_placement(session, slide_layer)
    return viewer.add_points(
        name=name, scale=scale, translate=translate, size=max(session.stride / 2, 4.0),
        features={"class": np.empty(0, dtype=int)}, ndim=2, **_units(slide_layer),
    )  # fmt: skip
