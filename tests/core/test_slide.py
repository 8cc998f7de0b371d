"""Slide I/O on the real sample files: metadata, pixels, µm/px, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from gpfm_core.errors import SlideError
from gpfm_core.slide import ImageSlide, OpenSlideSlide, open_slide


def test_svs_metadata(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        info = s.info
        assert isinstance(s, OpenSlideSlide)
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1 and s.level_downsamples == (1.0,)
        assert s.mpp == pytest.approx((0.499, 0.499))
        assert info.mpp_source == "metadata"
        assert info.vendor == "aperio"
        assert info.objective_power == 20.0
        assert s.tile_sizes == ((240, 240),)
        assert info.properties["aperio.AppMag"] == "20"
        assert len(info.slide_id) == 16 and int(info.slide_id, 16) >= 0
        d = json.loads(json.dumps(info.to_dict()))
        assert d["level_dimensions"] == [[2220, 2967]] and d["mpp"] == [0.499, 0.499]


def test_associated_images(cmu_svs: Path, he_png: Path) -> None:
    with open_slide(cmu_svs) as s:
        assert s.associated_names == ("label", "macro", "thumbnail")
        label = s.read_associated("label")
        assert label.shape == (463, 387, 3) and label.dtype == np.uint8
        with pytest.raises(SlideError, match=r"no associated image 'barcode' \(has: label"):
            s.read_associated("barcode")
    with open_slide(he_png) as p, pytest.raises(SlideError, match="has: none"):
        p.read_associated("label")


def test_slide_id_is_content_hash(cmu_svs: Path, he_png: Path, tmp_path: Path) -> None:
    copy = tmp_path / "renamed copy.svs"
    shutil.copyfile(cmu_svs, copy)
    with open_slide(cmu_svs) as a, open_slide(copy) as b, open_slide(he_png) as c:
        assert a.slide_id == b.slide_id
        assert a.slide_id != c.slide_id
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF  # change one byte in the last MiB
    copy.write_bytes(bytes(data))
    with open_slide(copy) as b2:
        assert b2.slide_id != a.slide_id


def test_svs_read_region_matches_openslide(cmu_svs: Path) -> None:
    ref = openslide.OpenSlide(str(cmu_svs))
    try:
        expected = np.asarray(ref.read_region((1000, 1200), 0, (300, 200)))[..., :3]
    finally:
        ref.close()
    with open_slide(cmu_svs) as s:
        got = s.read_region((1000, 1200), 0, (300, 200))
        assert got.shape == (200, 300, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)
        # outside the slide: transparent in OpenSlide -> white here
        out = s.read_region((2100, 2900), 0, (256, 256))
        assert (out[-50:, -50:] == 255).all()
        assert out[:60, :100].std() > 0  # the inside part is real content


def test_png_backend_pixels_and_missing_mpp(he_png: Path) -> None:
    expected = np.asarray(Image.open(he_png).convert("RGB"))
    with open_slide(he_png) as s:
        assert isinstance(s, ImageSlide)
        assert s.dimensions == (1000, 1000) and s.level_count == 1
        assert s.info.mpp is None and s.info.mpp_source is None
        assert s.tile_sizes == ((256, 256),)
        np.testing.assert_array_equal(
            s.read_region((10, 20), 0, (100, 50)), expected[20:70, 10:110]
        )
        edge = s.read_region((950, 950), 0, (100, 100))
        np.testing.assert_array_equal(edge[:50, :50], expected[950:, 950:])
        assert (edge[50:] == 255).all() and (edge[:, 50:] == 255).all()
        with pytest.raises(
            SlideError, match=r"has no µm/px .*pass mpp=\.\.\. \(CLI: --slide-mpp\)"
        ):
            _ = s.mpp


@pytest.mark.parametrize(
    ("override", "expected"),
    [(0.5, (0.5, 0.5)), ((0.25, 0.3), (0.25, 0.3)), ([1, 1], (1.0, 1.0))],
)
def test_mpp_override_wins(cmu_svs: Path, he_png: Path, override, expected) -> None:
    for path in (cmu_svs, he_png):
        with open_slide(path, mpp=override) as s:
            assert s.mpp == pytest.approx(expected)
            assert s.info.mpp_source == "override"


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red-ish, bottom half transparent black
    rgba[20:, :30, 3] = 128  # half-transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with open_slide(path) as s:
        rgb = s.read_region((0, 0), 0, (60, 40))
    np.testing.assert_array_equal(rgb[:20], np.broadcast_to([200, 0, 0], (20, 60, 3)))
    np.testing.assert_array_equal(rgb[20:, 30:], 255)
    assert np.abs(rgb[30, 10].astype(int) - [228, 127, 127]).max() <= 1


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ((20000.0, 20000.0), "CENTIMETER", (0.5, 0.5)),  # 20000 px/cm = 0.5 µm/px
        ((101600.0, 50800.0), "INCH", (0.25, 0.5)),
        ((72.0, 72.0), "INCH", None),  # screen default: not a scan resolution
        (None, None, None),
    ],
)
def test_plain_tiff_mpp_from_resolution_tags(tmp_path: Path, resolution, unit, expected) -> None:
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    path = tmp_path / "plain.tif"
    kw = {} if resolution is None else {"resolution": resolution, "resolutionunit": unit}
    tifffile.imwrite(path, img, photometric="rgb", **kw)
    with open_slide(path) as s:
        assert s.dimensions == (80, 64)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (80, 64)), img)
        if expected is None:
            assert s.info.mpp is None
        else:
            assert s.mpp == pytest.approx(expected)
            assert s.info.mpp_source == "metadata"


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [((20000.0, 20000.0), "CENTIMETER", (0.5, 0.5)), ((72.0, 72.0), "INCH", None)],
)
def test_tiled_tiff_goes_through_openslide(tmp_path: Path, resolution, unit, expected) -> None:
    img = np.random.default_rng(1).integers(0, 255, (600, 700, 3), dtype=np.uint8)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(
        path, img, photometric="rgb", tile=(256, 256), resolution=resolution, resolutionunit=unit
    )
    with open_slide(path) as s:
        assert isinstance(s, OpenSlideSlide) and s.info.vendor == "generic-tiff"
        assert s.tile_sizes == ((256, 256),)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (700, 600)), img)
        assert s.info.mpp == (pytest.approx(expected) if expected else None)


def test_thumbnail_fits_and_resembles(cmu_svs: Path, he_png: Path) -> None:
    with open_slide(cmu_svs) as s:
        th = s.get_thumbnail(300)
        assert th.dtype == np.uint8 and max(th.shape[:2]) == 300
        assert th.shape[:2] == (300, round(2220 * 300 / 2967))
        full = s.read_region((0, 0), 0, s.dimensions)
    ref = np.asarray(Image.fromarray(full).resize(th.shape[1::-1], Image.Resampling.BOX))
    assert np.abs(th.astype(int) - ref).mean() < 4
    with open_slide(he_png) as p:
        t2 = p.get_thumbnail((400, 100))
        assert t2.shape == (100, 100, 3)
        assert p.get_thumbnail(5000).shape == (1000, 1000, 3)  # never upsampled


def test_best_level_for_downsample(small_pyramid: Path) -> None:
    with open_slide(small_pyramid) as s:
        ds = s.level_downsamples
        assert s.level_count >= 3 and ds[0] == 1.0
        assert s.best_level_for_downsample(0.5) == 0
        assert s.best_level_for_downsample(1.0) == 0
        assert s.best_level_for_downsample(ds[1] - 1e-4) == 1  # within tolerance
        assert s.best_level_for_downsample(ds[1] * 1.5) == 1
        assert s.best_level_for_downsample(1e9) == s.level_count - 1
        # a level read equals the down-sampled level 0 closely
        w1, h1 = s.level_dimensions[1]
        lvl1 = s.read_region((0, 0), 1, (w1, h1))
        lvl0 = s.read_region((0, 0), 0, s.dimensions)
        down = np.asarray(Image.fromarray(lvl0).resize((w1, h1), Image.Resampling.BOX))
        assert np.abs(lvl1.astype(int) - down).mean() < 12


def test_close_and_context_manager(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        assert not s.closed
    assert s.closed
    s.close()  # idempotent
    with pytest.raises(SlideError, match="is closed"):
        s.read_region((0, 0), 0, (10, 10))
    assert "closed" in repr(s)


@pytest.mark.parametrize(
    ("level", "size", "match"),
    [
        (1, (10, 10), "level 1 does not exist"),
        (-1, (10, 10), "does not exist"),
        (0, (0, 5), "positive"),
    ],
)
def test_bad_read_arguments(cmu_svs: Path, level: int, size, match: str) -> None:
    with open_slide(cmu_svs) as s, pytest.raises(SlideError, match=match):
        s.read_region((0, 0), level, size)


def _make_bad(kind: str, tmp: Path, cmu: Path) -> Path:
    if kind == "missing":
        return tmp / "nope.svs"
    if kind == "directory":
        (tmp / "folder.svs").mkdir()
        return tmp / "folder.svs"
    path = {"truncated": "t.svs", "unsupported": "notes.txt", "xyz": "image.xyz"}.get(kind, "x.svs")
    path = tmp / ("fake.png" if kind == "text_png" else path)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = cmu.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.3)])
    elif kind == "truncated_tiff":
        path = tmp / "cut.tif"
        tifffile.imwrite(tmp / "whole.tif", np.zeros((300, 300, 3), np.uint8), photometric="rgb")
        path.write_bytes((tmp / "whole.tif").read_bytes()[:5000])
    else:
        path.write_text("this is not an image\n" * 20)
    return path


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing", "does not exist"),
        ("directory", "is a folder"),
        ("empty", r"is empty \(0 bytes\)"),
        ("text_svs", "not a readable .svs slide"),
        ("truncated", "truncated, corrupt or not a slide"),
        ("truncated_tiff", r"cut.tif looks truncated or corrupt: reading page 0 failed"),
        ("text_png", r"fake.png looks truncated or corrupt: decoding the image failed"),
        ("unsupported", "unsupported format '.txt'"),
        ("xyz", "unsupported format '.xyz'"),
    ],
)
def test_bad_files_raise_one_line(tmp_path: Path, cmu_svs: Path, kind: str, match: str) -> None:
    path = _make_bad(kind, tmp_path, cmu_svs)
    with pytest.raises(SlideError, match=match) as err:
        open_slide(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0, -0.5, math.nan, math.inf, "abc", (0.5,), (0.5, -1.0)])
def test_bad_mpp_override(cmu_svs: Path, bad) -> None:
    with pytest.raises(SlideError, match="mpp="):
        open_slide(cmu_svs, mpp=bad)
