"""Tile grids at physical resolution on the real SVS and a generated pyramid."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from gpfm_core.errors import GpfmError, SlideError
from gpfm_core.reader import TileBatchReader
from gpfm_core.slide import open_slide
from gpfm_core.tiling import TileGrid, make_tile_grid, read_tiles
from gpfm_core.tissue import TissueMask, detect_tissue

W, H = 2220, 2967  # CMU level 0


@pytest.mark.parametrize(
    ("mpp", "overlap", "size0", "stride0", "shape", "read_size"),
    [
        (0.5, 0, 224, 224, ((H - 224) // 224 + 1, (W - 224) // 224 + 1), 224),  # 13 x 9
        (0.5, 32, 224, 192, ((H - 224) // 192 + 1, (W - 224) // 192 + 1), 224),  # 15 x 11
        (1.0, 0, 449, 449, ((H - 449) // 449 + 1, (W - 449) // 449 + 1), 449),  # 6 x 4
        (None, 0, 224, 224, (13, 9), 224),  # native resolution
    ],
)
def test_cmu_grid_geometry(cmu_svs: Path, mpp, overlap, size0, stride0, shape, read_size) -> None:
    with open_slide(cmu_svs) as s:
        g = make_tile_grid(s, mpp=mpp, tile_px=224, overlap_px=overlap, tissue=False)
    assert (g.tile_size_level0, g.stride_level0, g.grid_shape) == (size0, stride0, shape)
    assert (g.read_level, g.read_size) == (0, read_size)
    assert len(g) == shape[0] * shape[1]
    assert g.effective_mpp == pytest.approx(size0 * 0.499 / 224)
    assert g.coords.dtype == np.int64 and g.coords.shape == (len(g), 2)
    # row-major order and positions
    np.testing.assert_array_equal(g.coords[:2], [[0, 0], [stride0, 0]])
    np.testing.assert_array_equal(g.coords[shape[1]], [0, stride0])
    np.testing.assert_array_equal(g.coords, g.grid_rc[:, ::-1] * stride0)
    order = np.lexsort((g.grid_rc[:, 1], g.grid_rc[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(g)))
    # every tile lies fully inside the slide
    assert (g.coords >= 0).all()
    assert (g.coords[:, 0] + size0 <= W).all() and (g.coords[:, 1] + size0 <= H).all()
    assert (g.tissue_fraction == 1.0).all()


@pytest.mark.parametrize(
    ("mpp", "size0", "level", "read_size"),
    [
        (0.25, 224, 0, 224),
        (0.5, 448, 1, 224),
        (0.75, 672, 1, 336),
        (1.0, 896, 2, 224),
        (2.0, 1792, 3, 224),
    ],
)
def test_pyramid_read_level(small_pyramid: Path, mpp, size0, level, read_size) -> None:
    with open_slide(small_pyramid) as s:
        g = make_tile_grid(s, mpp=mpp, tile_px=224, tissue=False)
        assert (g.tile_size_level0, g.read_level, g.read_size) == (size0, level, read_size)
        idx = np.array([0, len(g) // 2, len(g) - 1])
        tiles = read_tiles(s, g, idx)
        assert tiles.shape == (3, 224, 224, 3) and tiles.dtype == np.uint8
        # same content as reading level 0 and shrinking it
        x, y = g.coords[idx[1]]
        ref = s.read_region((int(x), int(y)), 0, (size0, size0))
    ref = np.asarray(Image.fromarray(ref).resize((224, 224), Image.Resampling.BOX))
    assert np.abs(tiles[1].astype(int) - ref).mean() < 12


def test_tissue_filter_on_cmu(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        full = make_tile_grid(s, tissue=False)
        g = make_tile_grid(s, min_tissue=0.25)  # detects tissue itself
        mask = detect_tissue(s)
        g0 = make_tile_grid(s, min_tissue=0.0, tissue=mask)
        g9 = make_tile_grid(s, min_tissue=0.9, tissue=mask)
        np.testing.assert_array_equal(make_tile_grid(s, tissue=mask).coords, g.coords)
    assert len(g0) == len(full) == 117
    assert len(g9) < len(g) < len(full)  # measured 55 of 117 at 0.25
    assert (g.tissue_fraction >= 0.25).all() and (g.tissue_fraction <= 1.0).all()
    assert g.min_tissue == 0.25 and g.grid_shape == full.grid_shape
    # the kept tiles are a subset of the full grid, same positions
    full_set = {tuple(c) for c in full.coords}
    assert all(tuple(c) in full_set for c in g.coords)
    # tiles on tissue are more coloured than tiles dropped
    with open_slide(cmu_svs) as s:
        kept = read_tiles(s, g, [0, 1, 2]).reshape(-1, 3).astype(int)
    assert (kept.max(1) - kept.min(1)).mean() > 30


def test_edited_rectangle_restricts_tiles(cmu_svs: Path) -> None:
    rect = np.array([[500, 600], [1400, 600], [1400, 1500], [500, 1500]], float)
    mask = TissueMask.from_polygons([rect], level0_size=(W, H), downsample=4)
    with open_slide(cmu_svs) as s:
        g = make_tile_grid(s, mpp=0.5, tile_px=224, min_tissue=0.99, tissue=mask)
    # tiles fully inside x in [500, 1400], y in [600, 1500]: cols 3..5, rows 3..5
    assert sorted(map(tuple, g.grid_rc.tolist())) == [(r, c) for r in (3, 4, 5) for c in (3, 4, 5)]
    np.testing.assert_allclose(g.tissue_fraction, 1.0, atol=1e-5)


def test_blank_slide_gives_zero_tiles_with_warning(tmp_path: Path) -> None:
    path = tmp_path / "white.png"
    Image.fromarray(np.full((900, 1200, 3), 250, np.uint8)).save(path)
    with open_slide(path, mpp=0.5) as s, pytest.warns(UserWarning, match="0 tiles"):
        g = make_tile_grid(s)
    assert len(g) == 0 and g.coords.shape == (0, 2) and g.grid_shape == (4, 5)
    assert read_tiles(open_slide(path, mpp=0.5), g, []).shape == (0, 224, 224, 3)


def test_slide_smaller_than_tile(he_png: Path) -> None:
    with (
        open_slide(he_png, mpp=0.25) as s,
        pytest.warns(UserWarning, match="smaller than one tile"),
    ):
        g = make_tile_grid(s, mpp=2.0, tile_px=224, tissue=False)
    assert len(g) == 0 and g.grid_shape == (0, 0)


def test_unknown_mpp_needs_override(he_png: Path) -> None:
    with open_slide(he_png) as s, pytest.raises(SlideError, match="--slide-mpp"):
        make_tile_grid(s)
    with open_slide(he_png, mpp=0.5) as s:
        g = make_tile_grid(s, tissue=False)
    assert g.grid_shape == (4, 4) and g.slide_mpp == (0.5, 0.5)


def test_upsampling_warns(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s, pytest.warns(UserWarning, match="upsampled"):
        g = make_tile_grid(s, mpp=0.25, tissue=False)
    assert g.tile_size_level0 == 112 and g.read_size == 112
    with open_slide(cmu_svs) as s, warnings.catch_warnings():
        warnings.simplefilter("error")
        make_tile_grid(s, mpp=0.5, tissue=False)  # 0.499 -> 0.5 is not upsampling


def test_mask_of_another_slide_is_refused(cmu_svs: Path) -> None:
    mask = TissueMask.from_array(np.ones((10, 10), bool), level0_size=(1000, 1000))
    with open_slide(cmu_svs) as s, pytest.raises(SlideError, match="make the mask from this slide"):
        make_tile_grid(s, tissue=mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_px": 0}, "tile_px"),
        ({"tile_px": 22.5}, "tile_px"),
        ({"overlap_px": 224}, "overlap_px"),
        ({"overlap_px": -1}, "overlap_px"),
        ({"min_tissue": 1.5}, "min_tissue"),
        ({"mpp": -1.0}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
    ],
)
def test_bad_grid_arguments(cmu_svs: Path, kwargs, match: str) -> None:
    with open_slide(cmu_svs) as s, pytest.raises(GpfmError, match=match):
        make_tile_grid(s, tissue=False, **kwargs)


def test_attrs_are_hdf5_scalars(cmu_svs: Path, tmp_path: Path) -> None:
    with open_slide(cmu_svs) as s:
        g = make_tile_grid(s, overlap_px=16)
    attrs = g.attrs()
    assert attrs["n_tiles"] == len(g) and attrs["slide_id"] == g.slide_id
    assert attrs["stride_level0"] == 224 - 16 and attrs["patch_size_level0"] == 224
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("coords", data=g.coords).attrs.update(attrs)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        back = dict(f["coords"].attrs)
        np.testing.assert_array_equal(f["coords"][:], g.coords)
    assert {k: (v.decode() if isinstance(v, bytes) else v) for k, v in back.items()} == attrs


def test_subset_and_index_checks(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        g = make_tile_grid(s, tissue=False)
        sub = g.subset([5, 0, 7])
        assert isinstance(sub, TileGrid) and len(sub) == 3
        np.testing.assert_array_equal(sub.coords, g.coords[[5, 0, 7]])
        np.testing.assert_array_equal(read_tiles(s, sub), read_tiles(s, g, [5, 0, 7]))
        with pytest.raises(GpfmError, match="out of range"):
            read_tiles(s, g, [len(g)])
        with pytest.raises(GpfmError, match="integer"):
            read_tiles(s, g, [0.5])


# -- non-square pixels: tiles with the true x and y µm/px ----------------------------


def test_grid_built_from_scalars_keeps_square_geometry(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        g = make_tile_grid(s, mpp=0.5, tile_px=224, overlap_px=16, tissue=False)
    assert g.tile_size_level0_xy == (224, 224) and g.stride_level0_xy == (208, 208)
    assert g.read_size_xy == (224, 224) and g.effective_mpp_xy == pytest.approx((0.499, 0.499))
    # a TileGrid made the old way (no *_y arguments) is square
    old = TileGrid(
        coords=g.coords, grid_rc=g.grid_rc, grid_shape=g.grid_shape,
        tissue_fraction=g.tissue_fraction, requested_mpp=0.5, effective_mpp=0.499, tile_px=224,
        tile_size_level0=224, stride_level0=208, overlap_px=16, read_level=0, read_size=224,
        level0_size=g.level0_size, slide_mpp=g.slide_mpp, slide_id=g.slide_id,
    )  # fmt: skip
    assert old == g and old.attrs() == g.attrs()
    assert old.attrs()["stride_level0_y"] == 208 and old.attrs()["tile_size_level0_y"] == 224


def _physical_tile(cmu, x: int, y: int, size: tuple[int, int], tile_px: int) -> np.ndarray:
    """The CMU pixels under a non-square-slide tile at (x, y) of ``size`` (half the x)."""
    x0, w = x / 2, size[0] / 2  # non-square level-0 x = 2 * sample x
    left = math.floor(x0)
    region = cmu.read_region((left, y), 0, (math.ceil(w) + 2, size[1]))
    box = (x0 - left, 0.0, x0 - left + w, float(size[1]))
    img = Image.fromarray(region).resize((tile_px, tile_px), Image.Resampling.BICUBIC, box=box)
    return np.asarray(img).astype(int)


@pytest.mark.parametrize(
    ("mpp", "size_xy", "level", "read_xy"),
    [
        (0.5, (449, 224), 0, (449, 224)),
        (1.0, (898, 449), 1, (449, 224)),
        (2.0, (1796, 898), 2, (449, 224)),
    ],
)
def test_nonsquare_pixels_tile_the_same_square_of_tissue(
    nonsquare_tif: Path, cmu_svs: Path, mpp: float, size_xy, level: int, read_xy
) -> None:
    with open_slide(nonsquare_tif) as s, open_slide(cmu_svs) as cmu:
        assert s.mpp == pytest.approx((0.2495, 0.499))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "non-square" warning: the tiles are right
            g = make_tile_grid(s, mpp=mpp, tile_px=224, tissue=False)
        square = make_tile_grid(cmu, mpp=mpp, tile_px=224, tissue=False)
        assert g.tile_size_level0_xy == g.stride_level0_xy == size_xy
        assert (g.read_level, g.read_size_xy) == (level, read_xy)
        assert (g.tile_size_level0, g.stride_level0, g.read_size) == (
            size_xy[0],
            size_xy[0],
            read_xy[0],
        )
        # each side is tile_px * mpp µm, to one level-0 pixel
        for n, m in zip(size_xy, s.mpp, strict=True):
            assert abs(n * m - 224 * mpp) <= m
        assert g.effective_mpp_xy == pytest.approx((mpp, mpp), rel=0.005)
        assert g.grid_shape == square.grid_shape  # same physical grid as the sample
        np.testing.assert_array_equal(g.coords, g.grid_rc[:, ::-1] * np.array(size_xy))
        assert (g.coords[:, 0] + size_xy[0] <= s.dimensions[0]).all()
        assert (g.coords[:, 1] + size_xy[1] <= s.dimensions[1]).all()
        attrs = g.attrs()
        assert (attrs["tile_size_level0"], attrs["tile_size_level0_y"]) == size_xy
        assert (attrs["stride_level0"], attrs["stride_level0_y"]) == size_xy
        # the pixels are those of the same square of tissue on the sample
        idx = np.arange(0, len(g), max(1, len(g) // 8))
        tiles = read_tiles(s, g, idx).astype(int)
        new, old = [], []
        for k, i in enumerate(idx):
            x, y = (int(v) for v in g.coords[i])
            want = _physical_tile(cmu, x, y, size_xy, 224)
            new.append(np.abs(tiles[k] - want).mean())
            # x-only tiling (the old warning's behaviour) covers twice the height
            sq = s.read_region((x, y), 0, (size_xy[0], size_xy[0]))
            sq = np.asarray(Image.fromarray(sq).resize((224, 224), Image.Resampling.BICUBIC))
            old.append(np.abs(sq.astype(int) - want).mean())
        assert max(new) < 12 and np.mean(new) < 5
        assert np.mean(old) > 5 * np.mean(new)
        with TileBatchReader(nonsquare_tif, g, batch_size=4, indices=idx) as reader:
            np.testing.assert_array_equal(
                np.concatenate([t for _, t in reader]), tiles.astype(np.uint8)
            )


def test_nonsquare_tissue_keeps_the_samples_tiles(nonsquare_tif: Path, cmu_svs: Path) -> None:
    with open_slide(nonsquare_tif) as s, open_slide(cmu_svs) as cmu:
        g = make_tile_grid(s, mpp=0.5, tile_px=224)
        want = make_tile_grid(cmu, mpp=0.5, tile_px=224)
    got_rc = {tuple(map(int, rc)) for rc in g.grid_rc}
    want_rc = {tuple(map(int, rc)) for rc in want.grid_rc}
    assert len(want_rc) > 20
    assert len(got_rc & want_rc) / len(got_rc | want_rc) >= 0.9
