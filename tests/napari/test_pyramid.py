"""The lazy pyramid: level sizes, chunking on native tiles, exact pixels, bounded reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpfm_core.slide import Slide, open_slide
from napari_gpfm._pyramid import SlideLevelArray, build_pyramid, chunk_size


class ReadLog:
    """Records the size of every real ``read_region`` call of a slide (a spy, no fake)."""

    def __init__(self, slide: Slide) -> None:
        self.calls: list[tuple[int, int, int]] = []
        real = slide.read_region

        def spy(location: Any, level: int, size: Any) -> np.ndarray:
            self.calls.append((int(level), int(size[0]), int(size[1])))
            return real(location, level, size)

        slide.read_region = spy  # type: ignore[method-assign]


@pytest.fixture
def cmu(cmu_svs: Path) -> Slide:
    with open_slide(cmu_svs) as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu_level0(cmu_svs: Path) -> np.ndarray:
    """The whole CMU level 0 as one ``(2967, 2220, 3)`` array (reference pixels)."""
    with open_slide(cmu_svs) as slide:
        return slide.read_region((0, 0), 0, (2220, 2967))


@pytest.mark.parametrize(
    ("tile", "minimum", "expected"),
    [(240, 512, 720), (256, 512, 512), (512, 512, 512), (1024, 512, 1024), (100, 512, 600)],
)
def test_chunk_size_is_smallest_tile_multiple_at_least_minimum(
    tile: int, minimum: int, expected: int
) -> None:
    assert chunk_size(tile, minimum=minimum) == expected


def test_one_level_slide_gets_virtual_levels_down_to_overview(cmu: Slide) -> None:
    pyr = build_pyramid(cmu)
    shapes = [lvl.shape for lvl in pyr.levels]
    assert shapes == [(2967, 2220, 3), (1484, 1110, 3), (742, 555, 3)]
    assert pyr.downsamples == [1.0, 2.0, 4.0]
    assert [a.is_virtual for a in pyr.arrays] == [False, True, True]
    # CMU's native tiles are 240 px: chunks are 3 tiles (720 px), never cut a tile
    assert pyr.chunks[0] == (720, 720)
    assert all(c % 240 == 0 for c in pyr.levels[0].chunks[0][:-1])
    assert all(lvl.dtype == np.uint8 for lvl in pyr.levels)


def test_native_levels_are_used_as_they_are(small_pyramid: Path) -> None:
    with open_slide(small_pyramid) as slide:
        pyr = build_pyramid(slide)
        assert [a.shape[:2] for a in pyr.arrays] == [(h, w) for w, h in slide.level_dimensions]
        assert not any(a.is_virtual for a in pyr.arrays)
        assert pyr.chunks[0] == (512, 512)  # 256 px tiles -> 2 tiles per chunk


def test_level0_window_equals_read_region(cmu: Slide) -> None:
    pyr = build_pyramid(cmu)
    got = np.asarray(pyr.levels[0][1000:1300, 700:1111])
    assert got.shape == (300, 411, 3)
    np.testing.assert_array_equal(got, cmu.read_region((700, 1000), 0, (411, 300)))


def test_virtual_level_is_block_mean_of_level0(cmu: Slide) -> None:
    pyr = build_pyramid(cmu)
    got = np.asarray(pyr.levels[2][300:360, 250:330])  # ds 4
    src = cmu.read_region((1000, 1200), 0, (320, 240)).astype(np.float64)
    want = src.reshape(60, 4, 80, 4, 3).mean(axis=(1, 3))
    assert got.shape == (60, 80, 3)
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-9
    assert got.std() > 10  # real tissue, not a blank


def test_dask_and_array_backends_agree(cmu: Slide) -> None:
    dask_pyr = build_pyramid(cmu, backend="dask")
    arr_pyr = build_pyramid(cmu, backend="array")
    for d, a in zip(dask_pyr.levels, arr_pyr.levels, strict=True):
        np.testing.assert_array_equal(np.asarray(d[-100:, 10:200]), a[-100:, 10:200])


def test_overview_never_reads_full_resolution_at_once(cmu: Slide) -> None:
    log = ReadLog(cmu)
    pyr = build_pyramid(cmu)
    overview = np.asarray(pyr.levels[-1])
    assert overview.shape == (742, 555, 3)
    w0, h0 = cmu.dimensions
    biggest = max(w * h for _, w, h in log.calls)
    # each read is one chunk's footprint: 720 px chunks x ratio 4, never the whole slide
    assert biggest <= (720 * 4) ** 2
    assert biggest < w0 * h0
    assert len(log.calls) >= 2


def test_coarsest_native_level_read_for_overview(small_pyramid: Path) -> None:
    with open_slide(small_pyramid) as slide:
        log = ReadLog(slide)
        pyr = build_pyramid(slide)
        np.asarray(pyr.levels[-1])
        assert {lvl for lvl, _, _ in log.calls} == {slide.level_count - 1}


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ((slice(0, 10), slice(5, 25)), (10, 20, 3)),
        ((slice(0, 10, 2), slice(5, 25, 5), 0), (5, 4)),
        ((3, slice(0, 7)), (7, 3)),
        ((slice(0, 7), 3), (7, 3)),
        ((3, 4), (3,)),
        ((Ellipsis, 1), (2967, 2220)),
        ((slice(2960, 3000), slice(2210, 2300)), (7, 10, 3)),
    ],
)
def test_level_array_indexing_matches_numpy(
    cmu: Slide, cmu_level0: np.ndarray, key: Any, shape: tuple[int, ...]
) -> None:
    arr = SlideLevelArray(cmu, downsample=1.0, shape=(2967, 2220))
    got = arr[key]
    assert got.shape == shape
    np.testing.assert_array_equal(got, cmu_level0[key])


def test_failed_read_is_white_and_reported_once(cmu_svs: Path) -> None:
    slide = open_slide(cmu_svs)
    errors: list[str] = []
    pyr = build_pyramid(slide, on_error=errors.append)
    slide.close()  # every later read fails inside the backend
    a = np.asarray(pyr.levels[0][:600, :600])
    b = np.asarray(pyr.levels[1][:100, :100])
    assert (a == 255).all() and (b == 255).all()
    assert len(errors) == 1 and "closed" in errors[0]


def test_deepcopy_keeps_the_same_reader(cmu: Slide) -> None:
    import copy

    pyr = build_pyramid(cmu)
    dup = copy.deepcopy(pyr.levels[1])
    np.testing.assert_array_equal(np.asarray(dup[:50, :50]), np.asarray(pyr.levels[1][:50, :50]))


@pytest.mark.parametrize("name", ["padded", "padded_tags"])
def test_padded_pyramid_is_not_stretched(padded_twins: dict[str, Path], name: str) -> None:
    with open_slide(padded_twins[name]) as p, open_slide(padded_twins["twin"]) as t:
        pp, pt = build_pyramid(p), build_pyramid(t)
        assert pp.downsamples == pt.downsamples == [1.0, 2.0, 4.0, 8.0]
        shapes = [lvl.shape for lvl in pp.levels]
        assert shapes == [lvl.shape for lvl in pt.levels]
        assert shapes[1:] == [(1483, 1110, 3), (741, 555, 3), (370, 277, 3)]
        assert not any(a.is_virtual for a in pp.arrays)
        w0, h0 = p.dimensions
        for (h, w, _), ds in zip(shapes, pp.downsamples, strict=True):
            # each level covers level 0 (within one of its pixels): no padding, no stretch
            assert abs(w * ds - w0) < ds and abs(h * ds - h0) < ds
        for a, b in zip(pp.levels[1:], pt.levels[1:], strict=True):
            diff = np.abs(np.asarray(a).astype(int) - np.asarray(b))
            assert diff.mean() < 2.0 and np.percentile(diff, 99) < 40


def test_untrusted_level_is_left_out_of_the_pyramid(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    from gpfm_core.synth import write_pyramid_tiff

    path = write_pyramid_tiff(tmp_path / "odd.svs", cmu_rgb, mpp=0.499, factors=(1, (2, 4), 8))
    with open_slide(path) as slide:
        log = ReadLog(slide)
        pyr = build_pyramid(slide)
        assert pyr.downsamples == [1.0, 8.0]
        assert [a.source_level for a in pyr.arrays] == [0, 2]
        np.asarray(pyr.levels[-1][:64, :64])
        assert {lvl for lvl, _, _ in log.calls} == {2}
