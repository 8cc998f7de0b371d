"""The synthetic slide generator: OpenSlide reads it, with levels, µm/px and tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from gpfm_core.errors import SlideError
from gpfm_core.slide import open_slide
from gpfm_core.synth import make_synthetic_slide, write_pyramid_tiff
from gpfm_core.tissue import detect_tissue


@pytest.fixture(scope="module")
def sources(data_dir: Path) -> list[Path]:
    return [data_dir / "cmu_small_region.svs", data_dir / "he_patch_1000.png"]


def test_small_slide_opens_with_levels_mpp_and_tissue(tmp_path: Path, sources: list[Path]) -> None:
    out = make_synthetic_slide(
        tmp_path / "syn.svs", width=3000, height=2000, mpp=0.5, tile=256, sources=sources, seed=3
    )
    assert out == tmp_path / "syn.svs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.svs"]  # no temp file left
    assert openslide.OpenSlide.detect_format(str(out)) == "aperio"
    with open_slide(out) as s:
        assert s.dimensions == (3000, 2000)
        assert s.level_dimensions == ((3000, 2000), (1500, 1000), (750, 500))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert s.mpp == pytest.approx((0.5, 0.5)) and s.info.mpp_source == "metadata"
        assert s.info.objective_power == 20.0
        assert s.tile_sizes == ((256, 256),) * 3
        region = s.read_region((1000, 700), 0, (512, 512))
        assert region.std() > 20  # real texture, not a constant
        assert len(np.unique(region.reshape(-1, 3), axis=0)) > 1000
        mask = detect_tissue(s)
        assert 0.2 < mask.tissue_fraction < 0.85
        assert not mask.mask[0].any()  # glass along the border
        # the edge tiles (3000 is not a multiple of 256) are present and valid
        corner = s.read_region((2900, 1900), 0, (100, 100))
        assert corner.shape == (100, 100, 3)


def test_deterministic_and_seeded(tmp_path: Path, sources: list[Path]) -> None:
    kw = {"width": 700, "height": 600, "tile": 256, "sources": sources}
    a = make_synthetic_slide(tmp_path / "a.tif", seed=1, **kw)
    b = make_synthetic_slide(tmp_path / "b.tif", seed=1, **kw)
    c = make_synthetic_slide(tmp_path / "c.tif", seed=2, **kw)
    assert a.read_bytes() == b.read_bytes()
    with open_slide(a) as sa, open_slide(c) as sc:
        assert sa.level_count == 1 and sa.dimensions == (700, 600)
        assert sa.slide_id != sc.slide_id


def test_level_factor_four(tmp_path: Path, sources: list[Path]) -> None:
    out = make_synthetic_slide(
        tmp_path / "f4.svs", width=4500, height=1100, tile=256, sources=sources, level_factor=4
    )
    with open_slide(out) as s:
        assert s.level_dimensions == ((4500, 1100), (1125, 275), (281, 68))


def test_default_sources_come_from_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setenv("GPFM_DATA_DIR", str(data_dir))
    out = make_synthetic_slide(tmp_path / "d.svs", width=600, height=500, tile=256)
    assert out.is_file()
    monkeypatch.delenv("GPFM_DATA_DIR")
    with pytest.raises(SlideError, match="GPFM_DATA_DIR"):
        make_synthetic_slide(tmp_path / "e.svs", width=600, height=500)
    assert not (tmp_path / "e.svs").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 10}, "too small"),
        ({"tile": 100}, "multiple of 16"),
        ({"mpp": 0.0}, "mpp"),
        ({"level_factor": 3}, "level_factor"),
        ({"quality": 0}, "quality"),
        ({"name": "slide.png"}, ".svs or .tif"),
        ({"name": "missing/slide.svs"}, "does not exist"),
    ],
)
def test_bad_arguments(tmp_path: Path, sources: list[Path], kwargs: dict, match: str) -> None:
    kw = {"width": 600, "height": 500, "sources": sources, **kwargs}
    name = kw.pop("name", "x.svs")
    with pytest.raises(SlideError, match=match):
        make_synthetic_slide(tmp_path / name, **kw)
    assert list(tmp_path.iterdir()) == []


def test_bad_source_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    with pytest.raises(SlideError, match=r"bad\.svs"):
        make_synthetic_slide(tmp_path / "x.svs", width=600, height=500, sources=[bad])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((64, 64), np.uint8)}, r"\(H, W, 3\) uint8"),
        ({"mpp": (0.25, 0.5)}, "style='generic'"),
        ({"mpp": -1.0}, "positive"),
        ({"style": "leica"}, "'aperio' or 'generic'"),
        ({"tile": 100}, "multiple of 16"),
        ({"factors": (2, 4)}, "start with 1"),
    ],
)
def test_write_pyramid_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    kw = {"image": np.zeros((64, 64, 3), np.uint8), "mpp": 0.5, **kwargs}
    with pytest.raises(SlideError, match=match):
        write_pyramid_tiff(tmp_path / "x.svs", **kw)
    assert list(tmp_path.iterdir()) == []


def test_write_pyramid_levels_padding_and_tags(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    out = write_pyramid_tiff(
        tmp_path / "p.tif", img, mpp=(0.25, 0.5), factors=(1, 2, 4), tile=128,
        pad_to_tiles=True, pad_value=7, style="generic", level_resolution=True,
    )  # fmt: skip
    assert openslide.OpenSlide.detect_format(str(out)) == "generic-tiff"
    osr = openslide.OpenSlide(str(out))
    assert osr.level_dimensions == ((1000, 700), (512, 384), (256, 256))
    with open_slide(out) as s:
        assert s.mpp == pytest.approx((0.25, 0.5))
        assert s.level_dimensions == ((1000, 700), (500, 350), (250, 175))
        assert [g.basis for g in s.levels] == ["level 0", "resolution tags", "resolution tags"]
    padding = np.asarray(osr.read_region((0, 0), 2, (256, 256)))[200:, 200:, :3]
    assert (padding == 7).all()
