"""Create or update the dock's per-slide layers in place, and show one overlay at a time.

Every tile-resolution layer (one pixel per tile) is placed on the slide with
:func:`gpfm_core.analysis.raster.tile_layer_placement` (``scale = stride * mpp``,
``translate = ((stride - 1) / 2 + origin) * mpp`` per axis, in ``(row, col)`` order, with
the x and y strides and µm/px of the slide: they differ for non-square pixels) plus the
slide layer's own translate, so each pixel covers exactly its tile's level-0 region.

A session whose tiles do not all lie on its one raster (``SlideSession.exact`` False: a
CLAM file whose contours start their own grids) gets each overlay as a Shapes layer of
one filled box per tile, from ``coords`` and the tile size, coloured like the raster would
be (:func:`upsert_labels` / :func:`upsert_image` choose), so no tile is drawn off its place.

Each slide owns its layers. A layer the dock makes carries
``layer.metadata["gpfm"] = {"slide_id": ..., "kind": ..., "encoder": ..., "weights_hash": ...,
"tiling": {...}}`` (:func:`tag`) and is found by slide id and kind (:func:`find` with a
session), never by its name or size alone; its name is ``"<kind name> (<slide name>)"``
(:func:`layer_name`), e.g. ``gpfm: clusters (CMU-1)``. Layers are added once and then
updated (data / colormap / placement).

The analysis overlays of a slide (coverage, clusters, similarity, prediction and their
companions) would stack into muddy colours; :func:`show_only` shows one of them and hides
the others of that slide (the user may turn any back on with its eye icon).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
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
TISSUE = "gpfm: tissue"
INK = "gpfm: ink"
TILE_GRID = "gpfm: tile grid"
ATTENTION = "gpfm: attention"

#: ``layer.metadata`` key of the dock's provenance dict (see the module docstring).
META_KEY = "gpfm"

#: The overlay a tab shows -> the kinds shown with it (``query``: the query-tile marker).
OVERLAY_GROUPS: dict[str, tuple[str, ...]] = {
    COVERAGE: ("coverage",),
    CLUSTERS: ("clusters", "selection"),
    SIMILARITY: ("similarity", "query"),
    PREDICTION: ("prediction",),
    ATTENTION: ("attention",),
}
#: Kinds hidden whenever another analysis overlay of the slide is shown.
_OVERLAY_KINDS = frozenset(
    [k for group in OVERLAY_GROUPS.values() for k in group] + ["confidence", "tile_grid"]
)

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
    (tx, ty), (sx, sy) = session.tile_size_xy, session.stride_xy
    # centre pixels on overlapping tiles: (T - S) / 2 per axis
    scale, translate = tile_layer_placement(
        stride_level0=(sx, sy), mpp=session.mpp,
        origin_level0=(ox + (tx - sx) / 2.0, oy + (ty - sy) / 2.0),
    )  # fmt: skip
    if slide_layer is not None:
        translate = translate + np.asarray(slide_layer.translate, dtype=float)[-2:]
    return scale, translate


def box_placement(
    session: SlideSession, slide_layer: Layer | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, translate)`` of a layer of tile boxes in continuous level-0 ``(y, x)``
    (pixel ``x`` spans ``[x, x + 1]``, the convention of ``coords`` and tile sizes)."""
    scale, translate = slide_placement(session, slide_layer)
    return scale, translate - 0.5 * scale


def slide_placement(
    session: SlideSession, slide_layer: Layer | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, translate)`` of a layer in level-0 pixel data units (Shapes, Points)."""
    scale = np.array([session.mpp[1], session.mpp[0]], dtype=float)
    translate = (
        np.zeros(2) if slide_layer is None else np.asarray(slide_layer.translate, float)[-2:]
    )
    return scale, translate


def units_of(slide_layer: Layer | None) -> dict[str, Any]:
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


def kind_of(name: str) -> str:
    """Short kind of a layer-name constant: ``"gpfm: annotation points"`` -> ``"annotation_points"``."""
    return name.removeprefix("gpfm: ").replace(" ", "_")


def layer_name(name: str, slide_name: str) -> str:
    """Display name of slide ``slide_name``'s layer of kind ``name``: ``"gpfm: clusters (A)"``."""
    return f"{name} ({slide_name})"


def tag(layer: Layer, *, slide_id: str, kind: str, **extra: Any) -> dict[str, Any]:
    """Record ``layer.metadata["gpfm"] = {"slide_id", "kind", **extra}`` (replaced wholesale)."""
    info = {"slide_id": str(slide_id), "kind": str(kind), **extra}
    layer.metadata[META_KEY] = info
    return info


def info(layer: Any) -> Mapping[str, Any]:
    """The dock's provenance dict of ``layer`` (empty for layers the dock did not make)."""
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(META_KEY)
    return value if isinstance(value, Mapping) else {}


def layers_of(viewer: Any, slide_id: str, kinds: Any = None) -> list[Layer]:
    """Layers tagged with ``slide_id`` (and, when given, one of ``kinds``), in viewer order."""
    out = []
    for layer in viewer.layers:
        meta = info(layer)
        if meta.get("slide_id") == slide_id and (kinds is None or meta.get("kind") in kinds):
            out.append(layer)
    return out


def find(
    viewer: Any, name: str, session: SlideSession | None = None, *, slide_id: str | None = None
) -> Layer | None:
    """A layer of the viewer, or None.

    Parameters
    ----------
    name
        Without ``session`` / ``slide_id``: the exact layer name (e.g. a slide layer).
        With them: a kind constant (``CLUSTERS``, ``ANNOTATIONS`` ...) whose layer of that
        slide is wanted, matched on the layer's ``metadata["gpfm"]``.
    session, slide_id
        The slide whose layer is wanted.
    """
    sid = slide_id if slide_id is not None else (session.key if session is not None else None)
    if sid is None:
        return viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 - LayerList has no .get
    found = layers_of(viewer, sid, (kind_of(name),))
    return found[0] if found else None


def show_only(viewer: Any, session: SlideSession | str, name: str) -> Layer | None:
    """Show slide ``session``'s overlay ``name`` (a key of ``OVERLAY_GROUPS``), hide its others.

    Only layers of that slide are touched; the user can turn any of them on again. Returns
    the overlay shown (None when the slide has none of that kind yet).
    """
    sid = session if isinstance(session, str) else session.key
    keep = set(OVERLAY_GROUPS.get(name, (kind_of(name),)))
    for layer in layers_of(viewer, sid, _OVERLAY_KINDS - keep):
        if layer.visible:
            layer.visible = False
    main = find(viewer, name, slide_id=sid)
    for layer in layers_of(viewer, sid, keep):
        # only when hidden: setting visible=True redraws the layer (napari refreshes it)
        if not layer.visible and (layer is main or info(layer).get("kind") != "selection"):
            layer.visible = True  # the selection stays as the user left it
    return main


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


def _tile_values(session: SlideSession, data: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """(N,) per-tile values: ``values``, else read from the raster ``data`` at ``grid_rc``."""
    if values is not None:
        return np.asarray(values)
    return np.asarray(data)[session.grid_rc[:, 0], session.grid_rc[:, 1]]


def upsert_boxes(
    viewer: Any,
    name: str,
    session: SlideSession,
    slide_layer: Layer | None,
    colours: np.ndarray,
    *,
    opacity: float,
    visible: bool = True,
) -> Shapes:
    """Slide ``session``'s overlay ``name`` as one filled box per tile, from ``coords``.

    For sessions whose tiles are not all on one raster (``session.exact`` False): each box
    spans exactly its tile's level-0 pixels (``coords`` to ``coords + tile_size_xy``).

    Parameters
    ----------
    colours
        (N, 4) float RGBA per tile (alpha 0: not drawn).
    """
    layer = find(viewer, name, session)
    if not isinstance(layer, Shapes) or len(layer.data) != session.n_tiles:
        if layer is not None:
            viewer.layers.remove(layer)
        b = session.tile_boxes().astype(np.float64)
        rects = np.stack(
            [b[:, [1, 0]], b[:, [1, 2]], b[:, [3, 2]], b[:, [3, 0]]], axis=1
        )  # (N, 4, 2) continuous level-0 (y, x) corners
        scale, translate = box_placement(session, slide_layer)
        with keep_active(viewer):
            layer = viewer.add_shapes(
                list(rects) if len(rects) else None, shape_type="rectangle",
                name=layer_name(name, session.name), face_color=colours if len(rects) else "transparent",
                edge_width=0, edge_color="transparent", opacity=opacity, visible=visible,
                scale=scale, translate=translate, **units_of(slide_layer),
            )  # fmt: skip
        layer.editable = False
    elif len(colours):
        layer.face_color = colours
    _tag_from(layer, session, name)
    return layer


def upsert_labels(
    viewer: Any,
    name: str,
    data: np.ndarray,
    session: SlideSession,
    slide_layer: Layer | None = None,
    *,
    colormap: DirectLabelColormap | None = None,
    opacity: float = 0.5,
    values: np.ndarray | None = None,
) -> Labels | Shapes:
    """Create slide ``session``'s Labels layer of kind ``name`` or update it in place.

    ``data`` is the (rows, cols) raster; ``values`` the (N,) per-tile labels (default: read
    from ``data``), used when the session's tiles are drawn box by box (``session.exact``
    False: a Shapes layer, see :func:`upsert_boxes`).
    """
    if not session.exact:
        layer = find(viewer, name, session)
        cmap = colormap or (layer.metadata.get("gpfm_colormap") if layer is not None else None)
        labels = _tile_values(session, data, values).astype(np.int64)
        if cmap is None:
            cmap = label_colormap(palette(max(int(labels.max(initial=0)), 1)))
        colours = np.asarray(cmap.map(labels), np.float32)
        shapes = upsert_boxes(viewer, name, session, slide_layer, colours, opacity=opacity)
        shapes.metadata["gpfm_colormap"] = cmap
        return shapes
    scale, translate = placement(session, slide_layer)
    layer = find(viewer, name, session)
    if not isinstance(layer, Labels):
        if layer is not None:
            viewer.layers.remove(layer)
        with keep_active(viewer):
            layer = viewer.add_labels(
                data,
                name=layer_name(name, session.name),
                scale=scale,
                translate=translate,
                opacity=opacity,
                **units_of(slide_layer),
            )
        layer.editable = False
    else:
        _place(layer, scale, translate)
        set_raster(layer, data)
    _tag_from(layer, session, name)
    if colormap is not None:
        layer.colormap = colormap
    return layer


def _tag_from(layer: Layer, session: SlideSession, name: str) -> None:
    """Tag ``layer`` with ``session``'s provenance unless it already carries exactly that."""
    want = {"kind": kind_of(name), **session.provenance()}
    if dict(info(layer)) != want:
        tag(layer, **want)


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
    values: np.ndarray | None = None,
) -> Image | Shapes:
    """Create the Image layer ``name`` (lowest colour transparent) or update it in place.

    Contrast limits are set on creation and whenever the data change; colormap, opacity and
    the slider range (``contrast_range``, widened when needed) only on creation, so a user's
    choice survives the next update. Cells below the range (no tile) are transparent.
    ``values`` (N,) per tile (default: read from ``data``) colour the boxes of a session
    whose tiles are drawn box by box (``session.exact`` False, :func:`upsert_boxes`).
    """
    lo, hi = float(contrast_limits[0]), float(contrast_limits[1])
    if hi <= lo:
        hi = lo + 1e-3
    if not session.exact:
        cmap = transparent_low(colormap)
        v = _tile_values(session, data, values).astype(np.float64)
        colours = np.asarray(cmap.map(np.clip((v - lo) / (hi - lo), 0.0, 1.0)), np.float32)
        colours[~np.isfinite(v) | (v <= lo)] = 0.0  # below the range: transparent, as the raster
        shapes = upsert_boxes(
            viewer, name, session, slide_layer, colours, opacity=opacity, visible=visible
        )
        shapes.metadata["gpfm_contrast_limits"] = (lo, hi)
        return shapes
    scale, translate = placement(session, slide_layer)
    layer = find(viewer, name, session)
    if not isinstance(layer, Image):
        if layer is not None:
            viewer.layers.remove(layer)
        with keep_active(viewer):
            layer = viewer.add_image(
                data,
                name=layer_name(name, session.name),
                scale=scale,
                translate=translate,
                colormap=transparent_low(colormap),
                contrast_limits=(lo, hi),
                opacity=opacity,
                blending="translucent",
                interpolation2d="nearest",
                visible=visible,
                **units_of(slide_layer),
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
    _tag_from(layer, session, name)
    return layer


def upsert_tiles(
    viewer: Any, session: SlideSession, slide_layer: Layer | None, columns: dict[str, np.ndarray]
) -> Points:
    """Slide ``session``'s ``gpfm: tiles`` Points layer: tile centres with a ``features`` table.

    Parameters
    ----------
    columns
        Per-tile (N,) arrays merged into the table (e.g. ``cluster``, ``umap_x``, ``umap_y``,
        ``similarity``, ``prediction``, ``confidence``); the table always holds ``tile``,
        ``row``, ``col``, ``x``, ``y`` (level-0 centre).
    """
    import pandas as pd

    layer = find(viewer, TILES, session)
    same = (
        isinstance(layer, Points)
        and len(layer.data) == session.n_tiles
        and dict(info(layer)) == {"kind": kind_of(TILES), **session.provenance()}
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
                name=layer_name(TILES, session.name),
                features=table,
                scale=scale,
                translate=translate,
                size=max(min(session.stride_xy) // 4, 1),
                face_color="white",
                visible=False,
                **units_of(slide_layer),
            )
        _tag_from(layer, session, TILES)
    assert isinstance(layer, Points)
    for key, values in columns.items():
        layer.features[key] = np.asarray(values)  # in place: no per-point redraw
    return layer


def upsert_shapes(
    viewer: Any, name: str, session: SlideSession, slide_layer: Layer | None
) -> Shapes:
    """Slide ``session``'s annotation Shapes layer (data in level-0 pixels), created once."""
    layer = find(viewer, name, session)
    if isinstance(layer, Shapes):
        return layer
    scale, translate = slide_placement(session, slide_layer)
    layer = viewer.add_shapes(
        name=layer_name(name, session.name), scale=scale, translate=translate, edge_width=max(min(session.stride_xy) / 16, 2.0),
        face_color=[0, 0, 0, 0], features={"class": np.empty(0, dtype=int)}, ndim=2, **units_of(slide_layer),
    )  # fmt: skip
    tag(layer, slide_id=session.key, kind=kind_of(name))
    return layer


def upsert_points(
    viewer: Any, name: str, session: SlideSession, slide_layer: Layer | None
) -> Points:
    """Slide ``session``'s annotation Points layer (data in level-0 pixels), created once."""
    layer = find(viewer, name, session)
    if isinstance(layer, Points):
        return layer
    scale, translate = slide_placement(session, slide_layer)
    layer = viewer.add_points(
        name=layer_name(name, session.name), scale=scale, translate=translate, size=max(min(session.stride_xy) / 2, 4.0),
        features={"class": np.empty(0, dtype=int)}, ndim=2, **units_of(slide_layer),
    )  # fmt: skip
    tag(layer, slide_id=session.key, kind=kind_of(name))
    return layer
