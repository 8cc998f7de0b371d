"""Tissue detection on real and generated slides; masks from edited polygons/arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpfm_core.errors import GpfmError
from gpfm_core.slide import open_slide
from gpfm_core.tissue import Polygon, TissueMask, detect_tissue, mask_to_polygons


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return (mx - mn) / np.maximum(mx, 1)


@pytest.fixture(scope="module")
def cmu_mask(cmu_svs: Path) -> TissueMask:
    with open_slide(cmu_svs) as s:
        return detect_tissue(s)


def test_cmu_tissue_mask(cmu_svs: Path, cmu_mask: TissueMask) -> None:
    m = cmu_mask
    assert m.level0_size == (2220, 2967)
    assert m.downsample == pytest.approx((8 / 0.499, 8 / 0.499), rel=0.01)
    assert m.mask.dtype == bool and m.mask.shape == (185, 138)
    assert 0.2 < m.tissue_fraction < 0.9  # measured 0.375
    assert m.params["mask_mpp"] == pytest.approx(8.0, rel=0.01)
    assert m.ink is not None and m.ink.shape == m.mask.shape and m.ink.dtype == bool
    with open_slide(cmu_svs) as s:
        thumb = s.read_scaled(m.mask.shape[::-1])
    sat = _saturation(thumb)
    # tissue is coloured, the background is grey-white glass
    assert sat[m.mask].mean() > 0.25 > 0.1 > sat[~m.mask].mean()
    assert thumb[~m.mask].mean() > 225


def test_cmu_polygons_match_mask(cmu_mask: TissueMask) -> None:
    m = cmu_mask
    assert len(m.polygons) >= 1
    for p in m.polygons:
        x0, y0, x1, y1 = p.bounds
        assert -1 <= x0 < x1 <= 2221 and -1 <= y0 < y1 <= 2968
        assert p.exterior.dtype == np.float64 and p.exterior.shape[1] == 2
    redrawn = TissueMask.from_polygons(
        m.polygons, level0_size=m.level0_size, downsample=m.downsample
    )
    assert redrawn.mask.shape == m.mask.shape
    iou = (redrawn.mask & m.mask).sum() / (redrawn.mask | m.mask).sum()
    assert iou > 0.9
    area_px = sum(p.area for p in m.polygons)
    assert area_px / (2220 * 2967) == pytest.approx(m.tissue_fraction, rel=0.1)


def test_synthetic_slide_tissue(small_pyramid: Path) -> None:
    with open_slide(small_pyramid) as s:
        m = detect_tissue(s)
        assert m.downsample == pytest.approx((32.0, 32.0))  # 8 µm/px on a 0.25 µm/px slide
        assert 0.3 < m.tissue_fraction < 0.85
        # the generator leaves a glass margin along the border
        assert not m.mask[0].any() and not m.mask[:, 0].any()


def _png(tmp_path: Path, arr: np.ndarray, name: str) -> Path:
    path = tmp_path / name
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize("value", [255, 240])
def test_blank_slide_has_no_tissue(tmp_path: Path, value: int) -> None:
    rng = np.random.default_rng(0)
    arr = np.clip(value + rng.normal(0, 2, (600, 800, 3)), 0, 255).astype(np.uint8)
    with open_slide(_png(tmp_path, arr, "blank.png"), mpp=0.5) as s:
        m = detect_tissue(s)
    assert m.is_empty and m.tissue_fraction == 0.0 and m.polygons == []


@pytest.mark.parametrize("background", [0, 255])
def test_tissue_on_black_or_white_background(tmp_path: Path, he_png: Path, background: int) -> None:
    tissue = np.asarray(Image.open(he_png).convert("RGB"))[:400, :400]
    canvas = np.full((1200, 1600, 3), background, np.uint8)
    canvas[400:800, 600:1000] = tissue
    with open_slide(_png(tmp_path, canvas, "bg.png"), mpp=1.0) as s:
        m = detect_tissue(s, mask_mpp=4.0)
    assert m.mask.shape == (300, 400)
    truth = np.zeros((300, 400), bool)
    truth[100:200, 150:250] = True
    iou = (m.mask & truth).sum() / (m.mask | truth).sum()
    assert iou > 0.85
    assert len(m.polygons) >= 1


def test_unknown_mpp_uses_pixel_downsample(he_png: Path) -> None:
    with open_slide(he_png) as s:
        m = detect_tissue(s)
    assert m.downsample == (1.0, 1.0)  # 1000 px fits in 2048
    assert m.params["mask_mpp"] is None
    assert m.tissue_fraction > 0.8  # the patch is all tissue


def test_from_polygons_with_hole() -> None:
    outer = np.array([[100, 100], [900, 100], [900, 500], [100, 500]], float)
    hole = np.array([[300, 200], [500, 200], [500, 400], [300, 400]], float)
    m = TissueMask.from_polygons([Polygon(outer, [hole])], level0_size=(1000, 600), downsample=4)
    assert m.mask.shape == (150, 250) and m.downsample == (4.0, 4.0)
    assert m.mask.sum() * 16 == pytest.approx(800 * 400 - 200 * 200, rel=0.02)
    assert not m.mask[300 // 4 + 5, 400 // 4]  # inside the hole
    assert m.polygons[0].area == pytest.approx(800 * 400 - 200 * 200)
    plain = TissueMask.from_polygons([outer], level0_size=(1000, 600), downsample=(4, 4))
    assert plain.mask.sum() * 16 == pytest.approx(800 * 400, rel=0.02)


def test_from_array_and_polygons_geometry() -> None:
    labels = np.zeros((60, 80), np.int32)
    labels[10:50, 10:70] = 3  # a ring: an island with a hole
    labels[20:40, 30:50] = 0
    labels[2:6, 72:78] = 1  # a small second island
    m = TissueMask.from_array(labels, level0_size=(800, 600))
    assert m.mask.dtype == bool and m.downsample == (10.0, 10.0)
    assert m.tissue_fraction == pytest.approx((labels > 0).mean())
    polys = sorted(m.polygons, key=lambda p: -p.area)
    assert len(polys) == 2 and len(polys[0].holes) == 1 and polys[1].holes == []
    # outlines follow pixel edges up to half a mask pixel (corners are cut diagonally)
    assert polys[0].bounds == pytest.approx((100, 100, 700, 500), abs=5)
    assert polys[1].bounds == pytest.approx((720, 20, 780, 60), abs=5)
    hole = polys[0].holes[0]
    assert (hole.min(0), hole.max(0)) == (
        pytest.approx([300, 200], abs=5),
        pytest.approx([500, 400], abs=5),
    )


def test_mask_to_polygons_on_border() -> None:
    mask = np.ones((5, 5), bool)
    (p,) = mask_to_polygons(mask, (2.0, 2.0))
    assert p.bounds == pytest.approx((0, 0, 10, 10), abs=1)


def test_box_fractions_exact() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    m = TissueMask(mask, (10.0, 10.0), (40, 40))
    coords = np.array([[10, 10], [0, 0], [15, 15], [30, 30], [5, 10]])
    got = m.box_fractions(coords, 20)
    expected = [1.0, 0.25, 0.5625, 0.0, 0.75]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # against brute force on a 10x finer raster
    fine = np.repeat(np.repeat(mask, 10, 0), 10, 1)
    rng = np.random.default_rng(1)
    pts = rng.integers(0, 25, (50, 2))
    brute = [fine[y : y + 15, x : x + 15].mean() for x, y in pts]
    np.testing.assert_allclose(m.box_fractions(pts, 15), brute, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: TissueMask.from_array(np.zeros(5), level0_size=(5, 1)), "2-D array"),
        (
            lambda: TissueMask.from_polygons([np.zeros((2, 2))], level0_size=(9, 9), downsample=1),
            "K>=3",
        ),
        (lambda: TissueMask.from_polygons([], level0_size=(9, 9), downsample=0), "positive"),
    ],
)
def test_bad_mask_inputs(call, match: str) -> None:
    with pytest.raises(GpfmError, match=match):
        call()


def test_edited_masks_have_no_ink_layer() -> None:
    m = TissueMask.from_array(np.ones((10, 20), np.uint8), level0_size=(200, 100))
    assert m.ink is None and m.params == {"method": "array"}
    coords = np.array([[0, 0], [50, 20], [150, 80]])
    np.testing.assert_array_equal(m.ink_fractions(coords, 20), np.zeros(3, np.float32))
    np.testing.assert_array_equal(m.box_fractions(coords, 20), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("close_um", [48.0, 160.0])  # disc footprint (3 px), distance map (10 px)
def test_wider_closing_only_adds_tissue(cmu_svs: Path, cmu_mask: TissueMask, close_um) -> None:
    with open_slide(cmu_svs) as s:
        wide = detect_tissue(s, close_um=close_um)
    assert (wide.mask | cmu_mask.mask).sum() == wide.mask.sum()  # a superset ...
    assert wide.tissue_fraction > cmu_mask.tissue_fraction + 0.005  # ... with gaps closed
    assert wide.n_regions <= cmu_mask.n_regions
