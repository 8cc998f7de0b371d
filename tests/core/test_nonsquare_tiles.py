"""Non-square pixels end to end in the library: every consumer of a tile size takes (x, y).

A slide whose pixels are 0.2495 x 0.499 µm (the ``nonsquare_tif`` fixture: the CMU sample
stretched 2x along x) is tiled with level-0 boxes twice as wide as tall, each the same
square of tissue. Placement, labelling, click look-up, GeoJSON / CSV export and the feature
file's geometry must all use the box's true width and height.
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from shapely.geometry import LineString, Polygon

from gpfm_core.analysis import (
    labels_for_shapes,
    predictions_to_csv,
    predictions_to_geojson,
    query_from_point,
    tile_layer_placement,
)
from gpfm_core.embed import embed_slide, load_embeddings
from gpfm_core.embed.geometry import tile_geometry
from gpfm_core.errors import GpfmError

# three tiles of a 2:1 grid: (x, y) corners, each box 40 x 20 level-0 px
COORDS = np.array([[0, 0], [40, 0], [0, 20]], np.int64)
SIZE = (40, 20)


@pytest.mark.parametrize(
    ("stride", "origin", "mpp"),
    [((448, 224), (0, 0), (0.25, 0.5)), ((37, 11), (13, 5), (0.2, 0.6)), ((1, 2), (0, 0), None)],
)
def test_placement_covers_each_tile_per_axis(stride, origin, mpp) -> None:
    scale, translate = tile_layer_placement(stride_level0=stride, mpp=mpp, origin_level0=origin)
    (sx, sy), (mx, my) = stride, (1.0, 1.0) if mpp is None else mpp
    for r, c in [(0, 0), (3, 11)]:
        for axis, i, s, o, m in ((1, c, sx, origin[0], mx), (0, r, sy, origin[1], my)):
            centre = i * scale[axis] + translate[axis]
            lo, hi = centre - scale[axis] / 2, centre + scale[axis] / 2
            first, last = o + i * s, o + i * s + s - 1  # the tile's level-0 pixels
            assert (lo, hi) == pytest.approx(((first - 0.5) * m, (last + 0.5) * m))


def test_placement_takes_float_strides_and_refuses_bad_ones() -> None:
    scale, _ = tile_layer_placement(stride_level0=(31.25, 16.0), mpp=(0.25, 0.5))
    assert scale.tolist() == [8.0, 7.8125]  # a mask's (dx, dy) places its pixels too
    for bad in (0, (4, 0), (4, np.nan), (1, 2, 3)):
        with pytest.raises(GpfmError, match="stride_level0 must be positive"):
            tile_layer_placement(stride_level0=bad, mpp=0.5)


@pytest.mark.parametrize(
    ("shape", "want"),
    [
        # a region labels the tiles whose centre (x + 19.5, y + 9.5, pixel centres) it holds
        (Polygon([(50, -1), (70, -1), (70, 15), (50, 15)]), [-1, 1, -1]),
        (Polygon([(10, 25), (30, 25), (30, 35), (10, 35)]), [-1, -1, 1]),
        # a line crossing y = 25 labels the lower tile only (the upper ends at y = 19.5)
        (LineString([(2, 25), (35, 25)]), [-1, -1, 1]),
        # it reaches into the second tile's box x in [39.5, 79.5): both upper tiles
        (LineString([(30, 5), (45, 5)]), [1, 1, -1]),
    ],
)
def test_labels_use_the_tile_width_and_height(shape, want) -> None:
    out = labels_for_shapes([shape], [1], COORDS, SIZE)
    assert out.labels.tolist() == want


def test_points_and_clicks_find_the_tile_by_its_width_and_height() -> None:
    pts = np.array([[60.0, 15.0], [5.0, 21.0], [60.0, 25.0]])
    out = labels_for_shapes([], [], COORDS, SIZE, points=pts, point_classes=[2, 3, 4])
    assert out.labels.tolist() == [-1, 2, 3]
    assert out.n_outside == 1  # (60, 25) is below the 20-px box (a 40-px square held it)
    assert query_from_point(60.0, 15.0, COORDS, SIZE) == 1
    assert query_from_point(60.0, 19.6, COORDS, SIZE) is None  # below the box, not in a 40-px one
    assert query_from_point(5.0, 21.0, COORDS, SIZE) == 2
    assert query_from_point(60.0, 19.6, COORDS, 40) == 1  # the square reading it replaces


def test_geojson_and_csv_write_the_true_tile_boxes(tmp_path: Path) -> None:
    fc = predictions_to_geojson(COORDS, SIZE, np.array([0, 1, 0]), ["a", "b"])
    rings = [f["geometry"]["coordinates"][0] for f in fc["features"]]
    assert rings[1] == [[40, 0], [80, 0], [80, 20], [40, 20], [40, 0]]
    merged = predictions_to_geojson(COORDS, SIZE, np.array([0, 1, 0]), ["a", "b"], merge=True)
    (a,) = [f for f in merged["features"] if f["properties"]["classification"]["name"] == "a"]
    ring = np.array(a["geometry"]["coordinates"][0])
    assert ring.min(axis=0).tolist() == [0, 0] and ring.max(axis=0).tolist() == [40, 40]
    path = predictions_to_csv(
        COORDS, np.array([0, 1, 0]), np.array([0.9, 0.8, 0.7]), ["a", "b"],
        path=tmp_path / "p.csv", tile_size_level0=SIZE,
    )  # fmt: skip
    rows = list(csv.DictReader(path.open()))
    assert [(r["x"], r["y"], r["width"], r["height"]) for r in rows] == [
        ("0", "0", "40", "20"), ("40", "0", "40", "20"), ("0", "20", "40", "20"),
    ]  # fmt: skip


def test_feature_file_of_a_nonsquare_slide_places_its_tiles_exactly(
    nonsquare_tif: Path, tmp_path: Path
) -> None:
    path = embed_slide(
        nonsquare_tif, encoder="tiny-vit", out_dir=tmp_path, mpp=2.0, device="cpu", workers=1
    )
    emb = load_embeddings(path)
    g = emb.geometry
    # 112 px at 2 µm/px: 898 level-0 px across (0.2495 µm), 449 down (0.499 µm)
    assert g.tile_size_level0_xy == (898, 449) and g.stride_level0_xy == (898, 449)
    assert g.exact and g.grid_error_level0 == 0 and g.source == "gpfm"
    np.testing.assert_array_equal(
        emb.tile_boxes()[:, 2:] - emb.coords, np.tile([898, 449], (len(emb), 1))
    )
    np.testing.assert_array_equal(
        emb.coords, np.asarray(g.origin) + emb.grid_rc[:, ::-1] * [898, 449]
    )
    with h5py.File(path, "r") as f:  # TRIDENT's attributes: its width, and the height beside
        assert f["coords"].attrs["patch_size_level0"] == 898
        assert f["coords"].attrs["patch_size_level0_y"] == 449
        trident_only = {k: v for k, v in f["coords"].attrs.items()}
    # a reader with only the coords' TRIDENT attributes gets the same boxes
    only, rc = tile_geometry(emb.coords, trident_only)
    assert only.source == "trident" and only.tile_size_level0_xy == (898, 449) and only.exact
    np.testing.assert_array_equal(rc, emb.grid_rc)


def test_clam_downsample_gives_each_axis_its_size() -> None:
    attrs = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 2.0])}
    coords = np.array([[0, 0], [1024, 0], [0, 512]], np.int64)
    geom, rc = tile_geometry(coords, attrs)
    assert geom.tile_size_level0_xy == (1024, 512) and geom.stride_level0_xy == (1024, 512)
    assert geom.exact and rc.tolist() == [[0, 0], [0, 1], [1, 0]]


def test_gpfm_tiles_prints_both_sides_of_a_nonsquare_tile(
    nonsquare_tif: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0.2495 x 0.499 µm pixels: a 224 px tile at 0.5 µm/px is about 449 x 224 level-0 px."""
    from gpfm_core.cli import main
    from gpfm_core.slide import open_slide
    from gpfm_core.tiling import make_tile_grid

    assert main(["tiles", str(nonsquare_tif), "--mpp", "0.5", "--tile-px", "224"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("geometry"))
    with open_slide(nonsquare_tif) as slide:
        grid = make_tile_grid(slide, mpp=0.5, tile_px=224)
    w, h = grid.tile_size_level0, grid.tile_size_level0_y
    assert w != h and f"= {w} x {h} level-0 px, stride {w} x {h}," in line
