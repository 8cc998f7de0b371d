"""Pyramid geometry is measured, not trusted: the rules, then padded pyramids end to end.

A padded pyramid (coarse levels padded up to whole tiles, as CAMELYON16 files are) must
give the same levels, reads, tissue mask and tiles as its unpadded twin; a level whose
geometry cannot be explained is skipped and reported by ``gpfm info``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest

from gpfm_core.cli import main
from gpfm_core.errors import SlideError
from gpfm_core.reader import TileBatchReader
from gpfm_core.slide import measure_levels, open_slide
from gpfm_core.synth import write_pyramid_tiff
from gpfm_core.tiling import make_tile_grid, read_tiles
from gpfm_core.tissue import detect_tissue

T256 = (256, 256)
T512 = (512, 512)
CMU = (2220, 2967)


@pytest.mark.parametrize(
    ("dims", "tile", "resolutions", "want"),
    [
        # unpadded powers of two, sizes rounded down or up: factor from the dimensions
        (
            [(4096, 3072), (2048, 1536), (1024, 768)],
            T256,
            None,
            [(2, (2048, 1536)), (4, (1024, 768))],
        ),
        ([(2221, 2967), (1110, 1483)], T256, None, [(2, (1110, 1483))]),
        ([(2221, 2967), (1111, 1484)], T256, None, [(2, (1111, 1484))]),
        # OpenSlide's CMU-1.svs: reported 4.0001 and 16.0014, true 4 and 16
        (
            [(46000, 32914), (11500, 8228), (2875, 2057)],
            (240, 240),
            None,
            [(4, (11500, 8228)), (16, (2875, 2057))],
        ),
        # padded to whole 256-px tiles: reported 1.833, 3.377, 5.065; true 2, 4, 8
        (
            [CMU, (1280, 1536), (768, 768), (512, 512)],
            T256,
            None,
            [(2, (1110, 1483)), (4, (555, 741)), (8, (277, 370))],
        ),
        # CAMELYON16-like: 512-px tiles, reported 1.995 and 3.0 and 4.5-ish
        (
            [(97792, 221184), (49152, 110592), (24576, 55296)],
            T512,
            None,
            [(2, (48896, 110592)), (4, (24448, 55296))],
        ),
        ([(100000, 51000), (50176, 12800)], T512, None, None),  # y is 4x, x is 2x: no factor
        ([(4000, 2000), (1024, 512)], T512, None, [(4, (1000, 500))]),  # reported 3.95
        ([(4600, 4600), (1024, 1024)], T512, None, [(8, (575, 575))]),  # reported 4.49
        # a whole factor other than two, exact on both axes, is believed
        ([(3000, 2400), (1000, 800)], T256, None, [(3, (1000, 800))]),
        # 3x exactly or 4x padded to whole tiles: cannot tell, untrusted ...
        ([(3072, 3072), (1024, 1024)], T512, None, None),
        # ... unless the level's resolution tags say which
        ([(3072, 3072), (1024, 1024)], T512, [(400.0, 400.0), (100.0, 100.0)], [(4, (768, 768))]),
        (
            [(3072, 3072), (1024, 1024)],
            T512,
            [(400.0, 400.0), (133.3333, 133.3333)],
            [(3, (1024, 1024))],
        ),
        # tags copied unchanged onto every level say nothing
        ([CMU, (1280, 1536)], T256, [(2004.0, 2004.0), (2004.0, 2004.0)], [(2, (1110, 1483))]),
        # tags that contradict the size, or scale x and y differently: untrusted
        ([CMU, (1110, 1483)], T256, [(2004.0, 2004.0), (501.0, 501.0)], None),
        ([CMU, (1110, 1483)], T256, [(2004.0, 2004.0), (1002.0, 501.0)], None),
        # x and y disagree / bigger than level 0 / fractional without tags: untrusted
        ([(4000, 3000), (2000, 750)], T256, None, None),
        ([(1000, 800), (2000, 1600)], T256, None, None),
        ([(1000, 800), (400, 320)], T256, None, None),
        # padding needs tiles: an untiled level cannot be "padded to whole tiles"
        ([(1000, 1000), (512, 512)], None, None, None),
        # padding of more than one tile is not padding to whole tiles
        ([(1000, 1000), (768, 768)], (128, 128), None, None),
    ],
)
def test_level_geometry_case_table(dims, tile, resolutions, want) -> None:
    tiles = None if tile is None else [tile] * len(dims)
    geoms = measure_levels(dims, tile_sizes=tiles, resolutions=resolutions)
    assert geoms[0].downsample == 1.0 and geoms[0].trusted and geoms[0].size == dims[0]
    for g, d in zip(geoms, dims, strict=True):
        assert g.reported_size == d
    if want is None:
        assert not geoms[-1].trusted and geoms[-1].basis == "untrusted"
        assert geoms[-1].note and "\n" not in geoms[-1].note
        return
    for g, (factor, size) in zip(geoms[1:], want, strict=True):
        assert g.trusted, g.note
        assert g.downsample == factor and g.size == size
        assert g.padded == (size != g.reported_size)


# -- padded pyramids from the CMU sample ---------------------------------------------


PADDED = ["padded", "padded_tags"]


@pytest.mark.parametrize("name", PADDED)
def test_padded_levels_get_their_true_geometry(padded_twins: dict[str, Path], name: str) -> None:
    osr = openslide.OpenSlide(str(padded_twins[name]))
    # the fault: OpenSlide's downsamples come out far from 2, 4, 8
    assert osr.level_dimensions[1:] == ((1280, 1536), (768, 768), (512, 512))
    assert osr.level_downsamples[1:] == pytest.approx((1.833, 3.377, 5.065), abs=1e-3)
    with open_slide(padded_twins[name]) as p, open_slide(padded_twins["twin"]) as t:
        assert p.level_downsamples == t.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert p.level_dimensions == t.level_dimensions
        assert p.level_dimensions[1:] == ((1110, 1483), (555, 741), (277, 370))
        assert all(g.trusted for g in p.levels) and p.info.untrusted_levels == ()
        assert [g.padded for g in p.levels] == [False, True, True, True]
        basis = "resolution tags" if name == "padded_tags" else "power of two"
        assert {g.basis for g in p.levels[1:]} == {basis}
        for ds in (1.0, 2.0, 3.9, 4.0, 7.9, 8.0, 100.0):
            assert p.best_level_for_downsample(ds) == t.best_level_for_downsample(ds)


@pytest.mark.parametrize("name", PADDED)
@pytest.mark.parametrize("level", [1, 2, 3])
def test_coarse_reads_come_from_the_right_place(
    padded_twins: dict[str, Path], name: str, level: int
) -> None:
    import tifffile

    f = 2**level
    with tifffile.TiffFile(padded_twins["twin"]) as tf:
        truth = tf.pages[level].asarray()  # the level's pixels as written
    osr = openslide.OpenSlide(str(padded_twins[name]))
    with open_slide(padded_twins[name]) as p, open_slide(padded_twins["twin"]) as t:
        for x, y in [(0, 0), (800, 1200), (1000, 2000), (1608, 2376)]:
            got = p.read_region((x, y), level, (48, 48)).astype(int)
            want = truth[y // f : y // f + 48, x // f : x // f + 48].astype(int)
            assert np.abs(got - want).mean() < 1.5, (x, y)
            # as close to the unpadded twin as the twin is to its own pixels
            twin = t.read_region((x, y), level, (48, 48)).astype(int)
            assert np.abs(got - twin).mean() <= np.abs(twin - want).mean() + 1.5
            if (x, y) != (0, 0):  # what the file's downsample alone gives: elsewhere
                raw = np.asarray(osr.read_region((x, y), level, (48, 48)))[..., :3].astype(int)
                assert np.abs(raw - want).mean() > 20
        assert np.abs(p.get_thumbnail(400).astype(int) - t.get_thumbnail(400)).mean() < 1.0


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


@pytest.mark.parametrize("name", PADDED)
def test_padded_pyramid_gives_the_twins_mask_and_tiles(
    padded_twins: dict[str, Path], name: str
) -> None:
    with open_slide(padded_twins[name]) as p, open_slide(padded_twins["twin"]) as t:
        mp, mt = detect_tissue(p), detect_tissue(t)
        assert mp.mask.shape == mt.mask.shape and mp.downsample == mt.downsample
        assert mt.tissue_fraction > 0.2  # the sample has tissue to compare
        assert (mp.mask == mt.mask).mean() >= 0.99
        gp = make_tile_grid(p, mpp=0.5, tile_px=224, tissue=mp)
        gt = make_tile_grid(t, mpp=0.5, tile_px=224, tissue=mt)
        assert len(gt) > 20
        tiles_p = {tuple(map(int, c)) for c in gp.coords}
        tiles_t = {tuple(map(int, c)) for c in gt.coords}
        assert _jaccard(tiles_p, tiles_t) >= 0.98


@pytest.mark.parametrize("name", PADDED)
@pytest.mark.parametrize(("mpp", "level"), [(1.0, 1), (2.0, 2), (4.0, 3)])
def test_tiles_at_coarse_mpp_read_the_same_pixels(
    padded_twins: dict[str, Path], name: str, mpp: float, level: int
) -> None:
    with open_slide(padded_twins[name]) as p, open_slide(padded_twins["twin"]) as t:
        gp = make_tile_grid(p, mpp=mpp, tile_px=112, tissue=False)
        gt = make_tile_grid(t, mpp=mpp, tile_px=112, tissue=False)
        assert gp.read_level == gt.read_level == level
        assert gp.read_size_xy == gt.read_size_xy
        np.testing.assert_array_equal(gp.coords, gt.coords)
        idx = np.arange(0, len(gp), max(1, len(gp) // 6))
        a, b = read_tiles(p, gp, idx).astype(int), read_tiles(t, gt, idx).astype(int)
        assert np.abs(a - b).mean() < 4.0
        with TileBatchReader(
            padded_twins[name], gp, batch_size=3, workers=2, indices=idx
        ) as reader:
            got = np.concatenate([tiles for _, tiles in reader])
        np.testing.assert_array_equal(got, a)


def test_level_that_fits_no_factor_is_skipped_and_reported(
    tmp_path: Path, cmu_rgb: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    # level 1 halves x but quarters y: no factor explains it
    path = write_pyramid_tiff(tmp_path / "odd.svs", cmu_rgb, mpp=0.499, factors=(1, (2, 4), 8))
    with open_slide(path) as s:
        assert s.info.untrusted_levels == (1,)
        assert not s.levels[1].trusted and "x gives 2x, y gives 4.004x" in s.levels[1].note
        assert s.levels[2].trusted and s.level_downsamples[2] == 8.0
        assert s.best_level_for_downsample(3.0) == 0  # a finer level is read instead
        assert s.best_level_for_downsample(8.0) == 2
        with pytest.raises(SlideError, match=r"level 1 of odd\.svs is untrusted"):
            s.read_region((0, 0), 1, (10, 10))
        g = make_tile_grid(s, mpp=1.5, tile_px=112, tissue=False)
        assert g.read_level == 0 and read_tiles(s, g, [0]).shape == (1, 112, 112, 3)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped    level 1 (untrusted geometry)" in out
    assert "level 1: SKIPPED, untrusted: " in out and "x gives 2x, y gives 4.004x" in out
    assert main(["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["untrusted_levels"] == [1]
    assert [g["trusted"] for g in d["levels"]] == [True, False, True]


def test_info_shows_padding_and_true_factors(
    padded_twins: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(padded_twins["padded"])]) == 0
    out = capsys.readouterr().out
    assert (
        "level 3: 277 x 370 px, downsample 8, tiles 256 x 256 (file says 512 x 512 px, "
        "downsample 5.065: padding ignored; factor from power of two)"
    ) in out
    assert "skipped" not in out
    assert main(["info", str(padded_twins["padded_tags"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["level_downsamples"] == [1.0, 2.0, 4.0, 8.0]
    assert d["level_dimensions"][3] == [277, 370]
    assert d["levels"][3]["reported_size"] == [512, 512]
    assert d["levels"][3]["padding"] == [235, 142]
    assert d["levels"][3]["basis"] == "resolution tags" and d["untrusted_levels"] == []
