"""Tissue / tile-grid layers: exact placement over the slide, editing drives tiling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gpfm_core.slide import Slide, open_slide
from gpfm_core.tiling import make_tile_grid
from gpfm_core.tissue import detect_tissue
from napari_gpfm._layers import (
    GRID_LAYER,
    TISSUE_LAYER,
    add_analysis_layers,
    add_tile_grid_layer,
    add_tissue_layer,
    grid_to_labels,
    tile_layer_transform,
    tissue_from_layer,
    vector_layer_transform,
    viewer_camera,
)
from napari_gpfm._reader import slide_for_layer


@pytest.fixture
def cmu_view(make_napari_viewer, cmu_svs: Path):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(cmu_svs), plugin="napari-gpfm")
    slide = slide_for_layer(layer)
    assert slide is not None
    return viewer, layer, slide


def _slide_extent(layer, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    """World corners of level-0 pixels [r0..r1] x [c0..c1] (pixel edges at -0.5 / +0.5)."""
    a = layer.data_to_world([r0 - 0.5, c0 - 0.5])
    b = layer.data_to_world([r1 + 0.5, c1 + 0.5])
    return np.array([a, b], float)


@pytest.mark.parametrize(
    ("stride", "mpp", "origin"),
    [(224, (0.499, 0.499), (0, 0)), (37, (0.25, 0.3), (5, 11)), (1, (0.5, 0.5), (0, 0))],
)
def test_tile_transform_formula(
    stride: int, mpp: tuple[float, float], origin: tuple[int, int]
) -> None:
    t = tile_layer_transform(stride, mpp, origin=origin)
    mx, my = mpp
    assert t["scale"] == pytest.approx((stride * my, stride * mx))
    assert t["translate"] == pytest.approx(
        (((stride - 1) / 2 + origin[1]) * my, ((stride - 1) / 2 + origin[0]) * mx)
    )


def _assert_raster_on_tiles(viewer, slide_layer, slide, grid) -> None:
    """A tile raster placed by ``tile_layer_transform`` covers exactly its tiles' pixels."""
    sx, sy = grid.stride_level0_xy
    labels = viewer.add_labels(grid_to_labels(grid), **tile_layer_transform(grid, slide.mpp))
    rows, cols = grid.grid_shape
    for r, c in [(0, 0), (3, 5), (rows - 1, cols - 1)]:
        tile_world = np.array(
            [labels.data_to_world([r - 0.5, c - 0.5]), labels.data_to_world([r + 0.5, c + 0.5])]
        )
        want = _slide_extent(slide_layer, r * sy, c * sx, (r + 1) * sy - 1, (c + 1) * sx - 1)
        np.testing.assert_allclose(tile_world, want, rtol=0, atol=1e-9)
        # and back: the slide pixel at the tile's centre maps into tile (r, c)
        centre = slide_layer.data_to_world([r * sy + sy / 2, c * sx + sx / 2])
        np.testing.assert_array_equal(np.round(labels.world_to_data(centre)), [r, c])


def test_tile_labels_layer_is_pixel_exact_over_slide(cmu_view) -> None:
    viewer, slide_layer, slide = cmu_view
    grid = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=False)
    _assert_raster_on_tiles(viewer, slide_layer, slide, grid)


def test_grid_with_offset_origin_lands_on_its_tiles(cmu_view) -> None:
    viewer, slide_layer, slide = cmu_view
    grid = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=detect_tissue(slide))
    assert len(grid) > 0 and tuple(grid.grid_rc[0]) != (0, 0)
    sub = grid.subset(np.arange(3, len(grid)))  # origin inferred from any tile of the grid
    labels = viewer.add_labels(grid_to_labels(grid), **tile_layer_transform(sub, slide.mpp))
    x, y = grid.coords[5]
    r, c = grid.grid_rc[5]
    corner = labels.data_to_world([r - 0.5, c - 0.5])
    np.testing.assert_allclose(corner, _slide_extent(slide_layer, y, x, y, x)[0], atol=1e-9)


def test_tile_rectangles_cover_exactly_their_level0_pixels(cmu_view) -> None:
    viewer, slide_layer, slide = cmu_view
    grid = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=False)
    layer = add_tile_grid_layer(viewer, grid, mpp=slide.mpp)
    assert layer._type_string == "shapes" and len(layer.data) == len(grid)
    i = len(grid) // 2
    x, y = grid.coords[i]
    size = grid.tile_size_level0
    verts = layer.data[i]
    lo = layer.data_to_world(verts.min(axis=0))
    hi = layer.data_to_world(verts.max(axis=0))
    want = _slide_extent(slide_layer, y, x, y + size - 1, x + size - 1)
    np.testing.assert_allclose([lo, hi], want, atol=1e-9)


def test_large_grid_becomes_tile_resolution_labels(cmu_view) -> None:
    viewer, _, slide = cmu_view
    grid = make_tile_grid(slide, mpp=0.5, tile_px=16, tissue=False)  # 185 x 138 tiles
    layer = add_tile_grid_layer(viewer, grid, mpp=slide.mpp, max_shapes=5000)
    assert len(grid) > 5000 and layer._type_string == "labels"
    assert layer.data.shape == grid.grid_shape
    assert set(np.unique(layer.data)) == {1, 2}
    assert layer.name == GRID_LAYER


def test_rendered_tile_overlay_lands_on_its_tile(make_napari_viewer, cmu_svs: Path) -> None:
    viewer = make_napari_viewer(show=True)
    (slide_layer,) = viewer.open(str(cmu_svs), plugin="napari-gpfm")
    slide = slide_for_layer(slide_layer)
    grid = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=False)
    marks = np.zeros(grid.grid_shape, np.uint8)
    marks[6, 4] = 1
    from napari.utils.colormaps import DirectLabelColormap

    viewer.add_labels(
        marks,
        colormap=DirectLabelColormap(color_dict={0: "transparent", 1: "red", None: "transparent"}),
        units=("µm", "µm"),
        **tile_layer_transform(grid, slide.mpp),
    )
    s = grid.stride_level0
    # zoom so the marked tile and its neighbours fill the canvas
    viewer_camera(viewer).center = tuple(slide_layer.data_to_world([6.5 * s, 4.5 * s]))
    viewer_camera(viewer).zoom = 600 / (3 * s * 0.499)
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    red = (shot[..., 0] > 200) & (shot[..., 1] < 60) & (shot[..., 2] < 60)
    rows, cols = np.nonzero(red)
    h, w = red.shape
    # the red square is one tile (~s * zoom * mpp px wide) centred on the canvas centre
    side = s * 0.499 * viewer_camera(viewer).zoom
    assert abs((cols.max() - cols.min() + 1) - side) <= 3
    assert abs((rows.max() - rows.min() + 1) - side) <= 3
    assert abs((cols.min() + cols.max()) / 2 - (w - 1) / 2) <= 2
    assert abs((rows.min() + rows.max()) / 2 - (h - 1) / 2) <= 2


def _grid(slide: Slide, tissue) -> set[tuple[int, int]]:
    g = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=tissue)
    return {tuple(map(int, xy)) for xy in g.coords}


def test_unedited_tissue_layer_round_trips_to_same_tiles(cmu_view) -> None:
    viewer, _, slide = cmu_view
    tissue = detect_tissue(slide)
    layer = add_tissue_layer(viewer, tissue, mpp=slide.mpp)
    n_holes = sum(len(p.holes) for p in tissue.polygons)
    assert len(layer.data) == len(tissue.polygons) + n_holes
    assert list(layer.features["kind"]).count("hole") == n_holes
    back = tissue_from_layer(layer, slide)
    assert back.mask.shape == tissue.mask.shape
    # polygons are simplified outlines: the raster agrees on nearly every mask pixel
    assert (back.mask != tissue.mask).mean() < 0.02
    assert _grid(slide, back) == _grid(slide, tissue)


def test_editing_tissue_layer_changes_tile_grid(cmu_view) -> None:
    """Cutting a hole into the tissue drops its tiles; drawing tissue on glass adds tiles.

    The CMU sample is one tissue region (54 tiles of 224 px at 0.5 µm/px): the user edits it
    rather than deleting it (deleting the only region would leave no tile at all).
    """
    viewer, _, slide = cmu_view
    tissue = detect_tissue(slide)
    assert len(tissue.polygons) == 1
    layer = add_tissue_layer(viewer, tissue, mpp=slide.mpp)
    before = _grid(slide, tissue_from_layer(layer, slide))
    assert len(before) == 54
    # the user erases the upper right of the tissue: a shape of kind "hole" (level-0 y, x)
    y0, x0, y1, x1 = 60.0, 600.0, 1500.0, 1950.0
    layer.feature_defaults = {"kind": "hole"}
    layer.add_rectangles(np.array([[[y0, x0], [y1, x1]]], float))
    after_cut = _grid(slide, tissue_from_layer(layer, slide))
    assert after_cut < before
    inside = {(x, y) for x, y in before if x >= x0 and x + 224 <= x1 and y >= y0 and y + 224 <= y1}
    outside = {(x, y) for x, y in before if x + 224 <= x0 or y >= y1}
    assert inside and not (inside & after_cut)  # tiles under the hole are gone
    assert outside and outside <= after_cut  # tiles clear of it stay
    # ... and draws tissue over empty glass at the top left
    layer.feature_defaults = {"kind": "tissue"}
    layer.add_rectangles(np.array([[[0, 0], [700, 500]]], float))
    after_add = _grid(slide, tissue_from_layer(layer, slide))
    new = after_add - after_cut
    assert new and all(x + 224 <= 500 + 1 and y + 224 <= 700 + 1 for x, y in new)
    assert not any(x < 450 and y < 650 for x, y in before)


def test_tissue_labels_layer_converts_too(cmu_view) -> None:
    viewer, _, slide = cmu_view
    tissue = detect_tissue(slide)
    labels = viewer.add_labels(
        tissue.mask.astype(np.uint8), **tile_layer_transform(tissue.downsample, slide.mpp)
    )
    labels.data[:] = 0
    labels.data[:20, :20] = 1
    back = tissue_from_layer(labels, slide)
    assert back.mask.sum() == 400 and back.mask.shape == tissue.mask.shape


def test_no_tissue_gives_empty_layers_and_one_notice(
    make_napari_viewer, blank_png: Path, notes: Callable[[], list[str]]
) -> None:
    viewer = make_napari_viewer()
    slide = open_slide(blank_png)
    tissue, grid, tl, gl = add_analysis_layers(viewer, slide)
    assert tissue.is_empty and len(grid) == 0
    assert len(tl.data) == 0 and len(gl.data) == 0
    assert tl.name == TISSUE_LAYER and gl.name == GRID_LAYER
    msgs = [m for m in notes() if "blank.png" in m]
    assert len(msgs) == 1 and "no tissue" in msgs[0]
    slide.close()


# -- padded pyramids and non-square pixels --------------------------------------------


def _mark_tile(viewer, slide, grid, rc: tuple[int, int]):
    from napari.utils.colormaps import DirectLabelColormap

    marks = np.zeros(grid.grid_shape, np.uint8)
    marks[rc] = 1
    return viewer.add_labels(
        marks,
        colormap=DirectLabelColormap(color_dict={0: "transparent", 1: "red", None: "transparent"}),
        units=("µm", "µm"),
        **tile_layer_transform(grid, slide.mpp),
    )


def test_padded_overview_matches_its_twin_with_overlays(
    make_napari_viewer, padded_twins: dict[str, Path]
) -> None:
    shots = {}
    viewer = make_napari_viewer(show=True)  # one viewer: the same canvas for both
    for name in ("twin", "padded"):
        viewer.layers.clear()
        (layer,) = viewer.open(str(padded_twins[name]), plugin="napari-gpfm")
        slide = slide_for_layer(layer)
        # napari scales each level by its shape: 1, 2, 4, 8 (not 1.8, 3.4, 5.1)
        factors = np.asarray(layer.downsample_factors)[:, :2]
        np.testing.assert_allclose(factors[:, 0], [1, 2, 4, 8], rtol=0.01)
        np.testing.assert_allclose(factors[:, 1], [1, 2, 4, 8], rtol=0.01)
        grid = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=False)
        _mark_tile(viewer, slide, grid, (6, 4))
        viewer.reset_view()  # whole slide on screen: napari draws a coarse level
        shots[name] = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
        assert layer.data_level >= 2
    twin, padded = shots["twin"], shots["padded"]
    assert twin.shape == padded.shape
    assert np.abs(twin - padded).mean() < 1.0
    red = [(s[..., 0] > 200) & (s[..., 1] < 60) & (s[..., 2] < 60) for s in (twin, padded)]
    assert red[0].sum() > 50
    assert (red[0] != red[1]).sum() <= 0.02 * red[0].sum() + 8  # same tile, same place


@pytest.fixture
def nonsquare_view(make_napari_viewer, nonsquare_tif: Path):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(nonsquare_tif), plugin="napari-gpfm")
    slide = slide_for_layer(layer)
    assert slide is not None and slide.mpp == pytest.approx((0.2495, 0.499))
    np.testing.assert_allclose(layer.scale[-2:], (0.499, 0.2495))
    return viewer, layer, slide


def test_nonsquare_tile_rectangles_cover_their_pixels_and_a_square(nonsquare_view) -> None:
    viewer, slide_layer, slide = nonsquare_view
    grid = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=False)
    sx, sy = grid.tile_size_level0_xy
    assert (sx, sy) == (449, 224)
    layer = add_tile_grid_layer(viewer, grid, mpp=slide.mpp)
    for i in (0, len(grid) // 2, len(grid) - 1):
        x, y = grid.coords[i]
        verts = layer.data[i]
        lo = layer.data_to_world(verts.min(axis=0))
        hi = layer.data_to_world(verts.max(axis=0))
        want = _slide_extent(slide_layer, y, x, y + sy - 1, x + sx - 1)
        np.testing.assert_allclose([lo, hi], want, atol=1e-9)
        side = np.asarray(hi) - np.asarray(lo)
        assert side == pytest.approx((112.0, 112.0), abs=0.5)  # µm: a square of tissue


def test_nonsquare_tile_raster_is_pixel_exact(nonsquare_view) -> None:
    viewer, slide_layer, slide = nonsquare_view
    grid = make_tile_grid(slide, mpp=0.5, tile_px=224, overlap_px=32, tissue=False)
    assert grid.stride_level0_xy == (385, 192)
    _assert_raster_on_tiles(viewer, slide_layer, slide, grid)


def test_nonsquare_rendered_tile_is_a_square_on_its_tile(
    make_napari_viewer, nonsquare_tif: Path
) -> None:
    viewer = make_napari_viewer(show=True)
    (slide_layer,) = viewer.open(str(nonsquare_tif), plugin="napari-gpfm")
    slide = slide_for_layer(slide_layer)
    grid = make_tile_grid(slide, mpp=0.5, tile_px=224, tissue=False)
    _mark_tile(viewer, slide, grid, (6, 4))
    sx, sy = grid.stride_level0_xy
    viewer_camera(viewer).center = tuple(slide_layer.data_to_world([6.5 * sy, 4.5 * sx]))
    viewer_camera(viewer).zoom = 600 / (3 * 112.0)
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    red = (shot[..., 0] > 200) & (shot[..., 1] < 60) & (shot[..., 2] < 60)
    rows, cols = np.nonzero(red)
    h, w = red.shape
    side = 112.0 * viewer_camera(viewer).zoom  # screen px of 112 µm
    assert abs((cols.max() - cols.min() + 1) - side) <= 3
    assert abs((rows.max() - rows.min() + 1) - side) <= 3
    assert abs((cols.min() + cols.max()) / 2 - (w - 1) / 2) <= 2
    assert abs((rows.min() + rows.max()) / 2 - (h - 1) / 2) <= 2


def test_nonsquare_tissue_layer_rasterises_at_square_mask_pixels(nonsquare_view) -> None:
    viewer, _, slide = nonsquare_view
    layer = viewer.add_shapes(
        [np.array([[0.0, 0.0], [0.0, 800.0], [400.0, 800.0], [400.0, 0.0]])],
        shape_type="polygon",
        **vector_layer_transform(slide.mpp),
    )
    mask = tissue_from_layer(layer, slide)
    # 8 µm mask pixels: 8 / 0.2495 level-0 px along x, 8 / 0.499 along y
    assert mask.downsample == pytest.approx((8 / 0.2495, 8 / 0.499))
    g = make_tile_grid(slide, mpp=0.5, tile_px=64, tissue=mask, min_tissue=0.99)
    assert len(g) > 0
    assert (g.coords[:, 0] + 128 <= 800 + 32).all() and (g.coords[:, 1] + 64 <= 400 + 16).all()
