"""A slide's own tissue, ink and tile-grid layers (named after it, tagged with its ``slide_id``).

The ink layer (``gpfm: ink (<slide>)``, kind ``ink``) shows the marker ink and marking dye
the detector found (:attr:`gpfm_core.tissue.TissueMask.ink`) at mask resolution: left out
of the tissue by default, kept with the Embed tab's "keep ink" box.

"Tissue + grid" (Embed tab) and the demo make them; the Embed tab reads the tissue layer of
the slide it embeds and nothing else. The tissue layer's ``metadata["gpfm"]["detected"]``
is the hash of its shapes as detected (:func:`tissue_fingerprint`): an edit changes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from napari_gpfm._widget import _overlays as ov


def tissue_fingerprint(layer: Any) -> str:
    """Hash of a tissue Shapes layer's shapes (vertices, types, kinds): tells an edit."""
    h = hashlib.sha1()
    kinds = layer.features["kind"] if "kind" in layer.features else [""] * len(layer.data)
    for verts, stype, kind in zip(layer.data, layer.shape_type, kinds, strict=False):
        h.update(np.ascontiguousarray(verts, dtype=np.float64).tobytes())
        h.update(f"|{stype}|{kind}|".encode())
    return h.hexdigest()[:16]


def add_slide_tissue_layers(
    viewer: Any, tissue: Any, grid: Any, *, slide_id: str, slide_name: str,
    mpp: tuple[float, float],
) -> tuple[Any, Any]:  # fmt: skip
    """Add slide ``slide_id``'s tissue and tile-grid layers, replacing only that slide's.

    Returns
    -------
    tuple
        ``(tissue_layer, grid_layer)``.
    """
    from napari_gpfm._layers import add_tissue_layer

    for layer in ov.layers_of(viewer, slide_id, ("tissue",)):
        viewer.layers.remove(layer)
    with ov.keep_active(viewer):
        layer = add_tissue_layer(viewer, tissue, mpp=mpp, name=ov.layer_name(ov.TISSUE, slide_name))
    own_tissue_layer(layer, slide_id=slide_id, slide_name=slide_name)
    add_slide_ink_layer(viewer, tissue, slide_id=slide_id, slide_name=slide_name, mpp=mpp)
    return layer, add_slide_grid_layer(
        viewer, grid, slide_id=slide_id, slide_name=slide_name, mpp=mpp
    )


#: Colour of marker ink on the ink layer (magenta: no stain or overlay uses it).
INK_RGBA = (1.0, 0.0, 1.0, 1.0)


def add_slide_ink_layer(
    viewer: Any, tissue: Any, *, slide_id: str, slide_name: str, mpp: tuple[float, float]
) -> Any:
    """Add (or replace) slide ``slide_id``'s ``gpfm: ink`` layer from ``tissue.ink``.

    A Labels layer at mask resolution (label 1 = ink), one pixel per mask pixel: placed with
    the tile-raster formula at the mask's ``downsample``. Returns None (and removes the
    slide's old ink layer) when the mask found no ink.
    """
    from napari_gpfm._layers import tile_layer_transform

    for layer in ov.layers_of(viewer, slide_id, ("ink",)):
        viewer.layers.remove(layer)
    ink = getattr(tissue, "ink", None)
    if ink is None or not np.asarray(ink).any():
        return None
    with ov.keep_active(viewer):
        layer = viewer.add_labels(
            np.asarray(ink, dtype=np.uint8), name=ov.layer_name(ov.INK, slide_name),
            colormap=ov.label_colormap(np.array([INK_RGBA])), opacity=0.6,
            units=("µm", "µm"), **tile_layer_transform(tuple(tissue.downsample), mpp),
        )  # fmt: skip
    layer.editable = False
    ov.tag(layer, slide_id=slide_id, kind="ink", fraction=float(np.mean(ink)))
    return layer


def own_tissue_layer(layer: Any, *, slide_id: str, slide_name: str) -> None:
    """Name a freshly detected tissue layer after its slide and tag it.

    ``metadata["gpfm"]["detected"]`` is the hash of its shapes as detected: an edit changes
    it (:func:`tissue_fingerprint`).
    """
    layer.name = ov.layer_name(ov.TISSUE, slide_name)
    ov.tag(layer, slide_id=slide_id, kind="tissue", detected=tissue_fingerprint(layer))


def own_grid_layer(layer: Any, grid: Any, *, slide_id: str, slide_name: str) -> None:
    """Name a tile-grid layer after its slide and tag it with the grid's size and tiling."""
    layer.name = ov.layer_name(ov.TILE_GRID, slide_name)
    ov.tag(
        layer, slide_id=slide_id, kind="tile_grid", n_tiles=len(grid),
        tiling={"requested_mpp": grid.requested_mpp, "tile_px": grid.tile_px, "overlap_px": grid.overlap_px},
    )  # fmt: skip


def add_slide_grid_layer(
    viewer: Any, grid: Any, *, slide_id: str, slide_name: str, mpp: tuple[float, float]
) -> Any:
    """Add (or replace) slide ``slide_id``'s ``gpfm: tile grid`` layer showing ``grid``."""
    from napari_gpfm._layers import add_tile_grid_layer

    for layer in ov.layers_of(viewer, slide_id, ("tile_grid",)):
        viewer.layers.remove(layer)
    with ov.keep_active(viewer):
        layer = add_tile_grid_layer(viewer, grid, mpp=mpp, name=ov.layer_name(ov.TILE_GRID, slide_name))
    own_grid_layer(layer, grid, slide_id=slide_id, slide_name=slide_name)
    return layer


def rescale_slide_layers(
    viewer: Any, slide_layer: Any, slide_id: str,
    old: tuple[float, float] | None, new: tuple[float, float] | None,
) -> None:  # fmt: skip
    """Place a slide at ``new`` µm/px ``(x, y)`` (None: pixels) instead of ``old``.

    The slide layer and its level-0 vector layers (tissue, annotations) are rescaled about
    the slide's origin; its tile-resolution layers (grid, coverage, overlays, tiles) are
    removed: their tiles were cut at the old µm/px.
    """
    o = np.array([1.0, 1.0] if old is None else [old[1], old[0]])
    n = np.array([1.0, 1.0] if new is None else [new[1], new[0]])
    units = ("pixel", "pixel") if new is None else ("µm", "µm")
    origin = np.zeros(2)
    if slide_layer is not None:
        origin = np.asarray(slide_layer.translate, float)[-2:]
        slide_layer.scale = n
        slide_layer.units = units
    for layer in ov.layers_of(viewer, slide_id):
        if ov.info(layer).get("kind") in ("tissue", "annotations", "annotation_points"):
            layer.scale = np.asarray(layer.scale, float)[-2:] * n / o
            layer.translate = origin + (np.asarray(layer.translate, float)[-2:] - origin) * n / o
            layer.units = units
        else:
            viewer.layers.remove(layer)
