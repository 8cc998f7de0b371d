"""Tissue and tile-grid layers on top of a slide layer, and their exact placement.

Coordinates: the slide layer has ``scale = mpp`` (µm per level-0 pixel, ``(row, col)``),
so level-0 pixel ``(r, c)`` is centred on world ``(r * my, c * mx)`` and covers
``[(r - 0.5) * my, (r + 0.5) * my)``. Vector layers (tissue polygons, tile rectangles)
store *continuous* level-0 coordinates (pixel ``x`` spans ``[x, x + 1]``, OpenSlide's
convention, the one ``TissueMask.polygons`` and ``TileGrid.coords`` use) and sit at
``translate = -0.5 * mpp``. A raster with one pixel per tile of stride ``S`` sits at
``scale = S * mpp``, ``translate = ((S - 1) / 2 + origin) * mpp``, per axis: with
non-square pixels the level-0 stride differs in x and y (``TileGrid.stride_level0_xy``)
and so does the µm/px, so that every tile is the same square of tissue.

Tissue is a Shapes layer (QuPath-like polygons the user edits with napari's shape
tools; holes are shapes whose feature ``kind`` is ``"hole"``). The tile grid is a Shapes
layer of rectangles up to :data:`MAX_TILE_SHAPES` tiles (napari adds ~5,000 rectangles
in about 0.7 s) and a tile-resolution Labels layer (checkerboard of tiles) above that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gpfm_core.slide import Slide
    from gpfm_core.tiling import TileGrid
    from gpfm_core.tissue import TissueMask

__all__ = [
    "GRID_LAYER",
    "MAX_TILE_SHAPES",
    "TISSUE_LAYER",
    "add_analysis_layers",
    "add_tile_grid_layer",
    "add_tissue_layer",
    "grid_to_labels",
    "tile_layer_transform",
    "tissue_from_layer",
    "vector_layer_transform",
]

log = logging.getLogger(__name__)

TISSUE_LAYER = "gpfm: tissue"
GRID_LAYER = "gpfm: tile grid"
#: Above this many tiles the grid is a tile-resolution Labels layer instead of rectangles.
MAX_TILE_SHAPES = 5000
#: Mask resolution (µm/px) used when an edited tissue layer is rasterised again.
DEFAULT_MASK_MPP = 8.0
_ELLIPSE_VERTICES = 64


def _mpp_xy(mpp: float | Sequence[float] | None) -> tuple[float, float]:
    if mpp is None:
        return (1.0, 1.0)
    if isinstance(mpp, (int, float, np.floating, np.integer)):
        return (float(mpp), float(mpp))
    mx, my = mpp
    return (float(mx), float(my))


def tile_layer_transform(
    grid_or_stride: TileGrid | float | Sequence[float],
    mpp: float | Sequence[float] | None,
    *,
    origin: Sequence[float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Scale and translate of a layer with one pixel per tile, over the slide layer.

    Parameters
    ----------
    grid_or_stride
        A ``TileGrid`` (uses ``stride_level0_xy`` and infers the grid origin from
        ``coords`` / ``grid_rc``), a stride in level-0 pixels, or ``(sx, sy)``.
    mpp
        µm per level-0 pixel, one number or ``(x, y)``; None for pixel units.
    origin
        Level-0 ``(x, y)`` of tile ``(0, 0)``'s top-left corner (default: from the grid,
        else ``(0, 0)``).

    Returns
    -------
    dict
        ``{"scale": (sy, sx), "translate": (ty, tx)}`` in ``(row, col)`` world units:
        ``scale = S * mpp``, ``translate = ((S - 1) / 2 + origin) * mpp``, the formula of
        :func:`gpfm_core.analysis.raster.tile_layer_placement`.
    """
    from gpfm_core.analysis.raster import tile_layer_placement

    ox, oy = 0.0, 0.0
    stride: Any = grid_or_stride  # a number or (sx, sy)
    if hasattr(grid_or_stride, "stride_level0_xy"):
        grid = grid_or_stride
        stride = tuple(float(v) for v in grid.stride_level0_xy)
        if len(grid) > 0:
            c0, rc0 = np.asarray(grid.coords[0]), np.asarray(grid.grid_rc[0])
            ox, oy = float(c0[0] - rc0[1] * stride[0]), float(c0[1] - rc0[0] * stride[1])
    if origin is not None:
        ox, oy = float(origin[0]), float(origin[1])
    scale, translate = tile_layer_placement(
        stride_level0=stride, mpp=None if mpp is None else _mpp_xy(mpp), origin_level0=(ox, oy)
    )
    return {"scale": tuple(scale.tolist()), "translate": tuple(translate.tolist())}  # type: ignore[dict-item]


def vector_layer_transform(mpp: float | Sequence[float] | None) -> dict[str, tuple[float, float]]:
    """Scale/translate of a Shapes/Points layer holding continuous level-0 ``(y, x)``.

    Returns
    -------
    dict
        ``{"scale": (my, mx), "translate": (-my / 2, -mx / 2)}``.
    """
    mx, my = _mpp_xy(mpp)
    return {"scale": (my, mx), "translate": (-0.5 * my, -0.5 * mx)}


def _units(mpp: float | Sequence[float] | None) -> tuple[str, str]:
    return ("pixel", "pixel") if mpp is None else ("µm", "µm")


def add_tissue_layer(
    viewer: Any,
    tissue: TissueMask,
    *,
    mpp: float | Sequence[float] | None,
    name: str = TISSUE_LAYER,
) -> Any:
    """Add ``tissue.polygons`` as an editable Shapes layer (replacing one of that name).

    Parameters
    ----------
    viewer
        The napari viewer.
    tissue
        Detected tissue; each polygon's exterior becomes a shape with feature
        ``kind="tissue"``, each hole a shape with ``kind="hole"``.
    mpp
        µm per level-0 pixel ``(x, y)`` of the slide (None: pixel units).
    name
        Layer name.

    Returns
    -------
    napari.layers.Shapes
        Vertices are ``(K, 2)`` continuous level-0 ``(y, x)``; ``metadata`` holds the
        mask downsample and level-0 size so :func:`tissue_from_layer` can rasterise it.
    """
    shapes: list[np.ndarray] = []
    kinds: list[str] = []
    for poly in tissue.polygons:
        shapes.append(np.asarray(poly.exterior, float)[:, ::-1])
        kinds.append("tissue")
        for hole in poly.holes:
            shapes.append(np.asarray(hole, float)[:, ::-1])
            kinds.append("hole")
    colors = {"tissue": "#39ff14", "hole": "#00bfff"}
    kwargs = {
        "name": name,
        "shape_type": "polygon",
        "edge_width": max(2.0, max(tissue.level0_size) / 400),
        "face_color": "transparent",
        "edge_color": [colors[k] for k in kinds] if kinds else "#39ff14",
        "features": {"kind": np.array(kinds, dtype=object)},
        "units": _units(mpp),
        "metadata": {
            "gpfm_kind": "tissue",
            "downsample": [float(v) for v in np.broadcast_to(tissue.downsample, (2,))],
            "level0_size": [int(v) for v in tissue.level0_size],
        },
        **vector_layer_transform(mpp),
    }
    _remove_named(viewer, name)
    layer = viewer.add_shapes(shapes if shapes else None, **kwargs)
    layer.feature_defaults = {"kind": "tissue"}
    layer.current_edge_color = colors["tissue"]
    layer.current_face_color = "transparent"
    return layer


def tissue_from_layer(layer: Any, slide: Slide) -> TissueMask:
    """Rasterise an (edited) tissue layer back to a ``TissueMask`` for tiling.

    Parameters
    ----------
    layer
        A Shapes layer (polygons, rectangles, ellipses; shapes with feature
        ``kind == "hole"`` are cut out of the tissue shape containing them; paths and
        lines are ignored) or a Labels layer at mask resolution (label > 0 is tissue).
    slide
        The slide the layer was drawn on (gives the level-0 size and µm/px).

    Returns
    -------
    TissueMask
        At the layer's mask downsample (default 8 µm/px).
    """
    from gpfm_core.tissue import Polygon, TissueMask

    level0 = tuple(int(v) for v in slide.dimensions)
    if getattr(layer, "_type_string", "") == "labels":
        return TissueMask.from_array(np.asarray(layer.data) > 0, level0_size=level0)
    ds = layer.metadata.get("downsample")
    if ds is None:
        mpp = slide.info.mpp if slide.info.mpp is not None else (1.0, 1.0)
        ds = [max(1.0, DEFAULT_MASK_MPP / m) for m in mpp]
    kinds = _shape_kinds(layer)
    outers: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for verts, stype, kind in zip(layer.data, layer.shape_type, kinds, strict=True):
        xy = _shape_polygon(np.asarray(verts, float), stype)
        if xy is None:
            continue
        (holes if kind == "hole" else outers).append(xy)
    owned: list[list[np.ndarray]] = [[] for _ in outers]
    for hole in holes:
        for i, outer in enumerate(outers):
            if _point_in(outer, hole.mean(axis=0)):
                owned[i].append(hole)
                break
    polygons = [Polygon(exterior=outer, holes=hs) for outer, hs in zip(outers, owned, strict=True)]
    return TissueMask.from_polygons(polygons, level0_size=level0, downsample=tuple(ds))


def _shape_kinds(layer: Any) -> list[str]:
    n = len(layer.data)
    feats = getattr(layer, "features", None)
    if feats is not None and "kind" in feats and len(feats) == n:
        return [str(k) if isinstance(k, str) else "tissue" for k in feats["kind"]]
    return ["tissue"] * n


def _shape_polygon(verts_yx: np.ndarray, stype: str) -> np.ndarray | None:
    """``(K, 2)`` float ``(x, y)`` outline of one napari shape, or None for lines."""
    if stype in ("line", "path") or len(verts_yx) < 3:
        return None
    yx = verts_yx[:, -2:]
    if stype == "ellipse":
        centre = yx.mean(axis=0)
        ry, rx = np.abs(yx - centre).max(axis=0)
        t = np.linspace(0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
        yx = np.stack([centre[0] + ry * np.sin(t), centre[1] + rx * np.cos(t)], axis=1)
    return np.ascontiguousarray(yx[:, ::-1])


def _point_in(poly_xy: np.ndarray, pt: np.ndarray) -> bool:
    from skimage.measure import points_in_poly

    return bool(points_in_poly(pt[None, :], poly_xy)[0])


def grid_to_labels(grid: TileGrid) -> np.ndarray:
    """Tile-resolution raster of a grid.

    Returns
    -------
    numpy.ndarray
        ``grid.grid_shape`` uint8: 0 where no tile, 1 or 2 (checkerboard by
        ``row + col``) where a tile is, so neighbouring tiles stay distinguishable.
    """
    out = np.zeros(tuple(int(v) for v in grid.grid_shape), np.uint8)
    rc = np.asarray(grid.grid_rc, np.int64).reshape(-1, 2)
    out[rc[:, 0], rc[:, 1]] = 1 + (rc.sum(axis=1) % 2)
    return out


def add_tile_grid_layer(
    viewer: Any,
    grid: TileGrid,
    *,
    mpp: float | Sequence[float] | None,
    name: str = GRID_LAYER,
    max_shapes: int = MAX_TILE_SHAPES,
) -> Any:
    """Add a grid as rectangles (``len(grid) <= max_shapes``) or a tile-resolution Labels.

    Parameters
    ----------
    viewer
        The napari viewer; a layer called ``name`` is replaced.
    grid
        The tiles; ``coords`` ``(N, 2)`` level-0 ``(x, y)`` top-left corners.
    mpp
        µm per level-0 pixel ``(x, y)`` (None: pixel units).
    name
        Layer name.
    max_shapes
        Largest grid drawn as Shapes rectangles.

    Returns
    -------
    napari.layers.Shapes or napari.layers.Labels
        Shapes: one rectangle per tile, ``(4, 2)`` continuous level-0 ``(y, x)``
        vertices (``grid.tile_size_level0_xy`` on a side), feature ``tile`` = tile
        index. Labels: ``grid.grid_shape`` raster placed with :func:`tile_layer_transform`.
    """
    _remove_named(viewer, name)
    meta = {"gpfm_kind": "tile_grid", "n_tiles": len(grid)}
    if len(grid) > max_shapes:
        from napari.utils.colormaps import DirectLabelColormap

        cmap = DirectLabelColormap(
            color_dict={0: "transparent", 1: "#ffd700", 2: "#ff8c00", None: "transparent"}
        )
        return viewer.add_labels(
            grid_to_labels(grid),
            name=name,
            opacity=0.35,
            colormap=cmap,
            units=_units(mpp),
            metadata=meta,
            **tile_layer_transform(grid, mpp),
        )
    tx, ty = (float(v) for v in grid.tile_size_level0_xy)
    xy = np.asarray(grid.coords, float).reshape(-1, 2)
    y, x = xy[:, 1], xy[:, 0]
    rects = np.stack(
        [
            np.stack([y, x], 1),
            np.stack([y, x + tx], 1),
            np.stack([y + ty, x + tx], 1),
            np.stack([y + ty, x], 1),
        ],
        axis=1,
    )
    return viewer.add_shapes(
        list(rects) if len(rects) else None,
        shape_type="rectangle",
        name=name,
        edge_width=max(1.0, min(tx, ty) / 40),
        edge_color="#ffd700",
        face_color="transparent",
        opacity=0.8,
        features={"tile": np.arange(len(rects), dtype=np.int64)},
        units=_units(mpp),
        metadata=meta,
        **vector_layer_transform(mpp),
    )


def _remove_named(viewer: Any, name: str) -> None:
    if name in viewer.layers:
        viewer.layers.remove(name)


def add_analysis_layers(
    viewer: Any,
    slide: Slide,
    *,
    tile_mpp: float = 0.5,
    tile_px: int = 224,
    min_tissue: float = 0.25,
) -> tuple[TissueMask, TileGrid, Any, Any]:
    """Detect tissue, lay the tile grid and add both layers (one notice when no tiles).

    Parameters
    ----------
    viewer
        The napari viewer holding the slide layer.
    slide
        The open slide (needs µm/px for tiling).
    tile_mpp, tile_px, min_tissue
        Passed to ``make_tile_grid``.

    Returns
    -------
    tuple
        ``(tissue, grid, tissue_layer, grid_layer)``; the grid may be empty (the tissue
        layer is then empty too, ready for the user to draw tissue).

    Raises
    ------
    GpfmError
        The slide has no µm/px (``SlideError`` naming the override); the tissue layer
        is already in the viewer then.
    """
    import warnings

    from gpfm_core.tiling import make_tile_grid
    from gpfm_core.tissue import detect_tissue
    from napari_gpfm._notify import notify_warning

    mpp = slide.info.mpp
    tissue = detect_tissue(slide)
    tissue_layer = add_tissue_layer(viewer, tissue, mpp=mpp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grid = make_tile_grid(
            slide, mpp=tile_mpp, tile_px=tile_px, min_tissue=min_tissue, tissue=tissue
        )
    for w in caught:
        log.info("tiling: %s", w.message)
    grid_layer = add_tile_grid_layer(viewer, grid, mpp=mpp)
    if len(grid) == 0:
        what = "no tissue found" if tissue.is_empty else "no tile has enough tissue"
        notify_warning(
            f"{slide.path.name}: {what}; draw the tissue in the '{TISSUE_LAYER}' layer "
            "or lower the minimum tissue fraction"
        )
    return tissue, grid, tissue_layer, grid_layer


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera
