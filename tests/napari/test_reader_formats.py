"""Every format the library opens is offered to napari: the manifest follows gpfm_core's list.

The manifest test fails when ``napari.yaml``'s ``filename_patterns`` differ from
``gpfm_core.slide._formats`` (``make manifest`` regenerates them); the npe2 test asks the real
plugin manager which readers it offers; the viewer tests open a DICOM series (written with
pydicom from the CMU sample) as a folder and as one of its files, and a BMP.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from _dicom_wsi import write_dicom_wsi
from gpfm_core.slide import SUPPORTED_SUFFIXES, open_slide
from gpfm_core.slide._formats import napari_filename_patterns
from napari_gpfm._reader import napari_get_reader

ROOT = Path(__file__).resolve().parents[2]
READER = "napari-gpfm.get_reader"
W, H = 768, 512


@pytest.fixture(scope="module")
def region(cmu_svs: Path) -> np.ndarray:
    with open_slide(cmu_svs) as s:
        return s.read_region((700, 1100), 0, (W, H))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, region: np.ndarray) -> list[Path]:
    return write_dicom_wsi(tmp_path_factory.mktemp("dicom") / "S01-HE", region, mpp=0.499)


def _sync_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sync", ROOT / "scripts/sync_napari_manifest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_manifest_patterns_are_the_librarys_list() -> None:
    from npe2 import PluginManifest

    (reader,) = PluginManifest.from_file(ROOT / "napari.yaml").contributions.readers
    assert reader.filename_patterns == napari_filename_patterns()
    assert {"*.dcm", "*.bmp"} <= set(reader.filename_patterns)
    assert reader.accepts_directories  # a DICOM series is a folder


def test_sync_script_regenerates_a_drifted_manifest() -> None:
    text = (ROOT / "napari.yaml").read_text(encoding="utf-8")
    drifted = text.replace('        - "*.dcm"\n', "").replace('"*.bmp"', '"*.gif"')
    assert drifted != text
    assert _sync_script().rewrite_manifest(drifted) == text


@pytest.mark.parametrize("suffix", sorted(SUPPORTED_SUFFIXES))
def test_npe2_offers_the_reader_for_every_suffix(suffix: str) -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    for name in (f"/slides/S01{suffix}", f"/slides/S01{suffix.upper()}"):
        assert READER in [r.command for r in pm.iter_compatible_readers(name)], name


def test_npe2_offers_the_reader_for_a_folder(series: list[Path]) -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert READER in [r.command for r in pm.iter_compatible_readers(str(series[0].parent))]


@pytest.mark.parametrize("member", [None, 1], ids=["folder", "level1-file"])
def test_dicom_series_opens_in_the_viewer(
    make_napari_viewer, series: list[Path], region: np.ndarray, member: int | None
) -> None:
    viewer = make_napari_viewer()
    path = series[0].parent if member is None else series[member]
    (layer,) = viewer.open(str(path), plugin="napari-gpfm")
    assert layer.name == "S01-HE"  # the series' folder names the slide
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, [0.499, 0.499])
    assert tuple(layer.level_shapes[0]) == (H, W)
    np.testing.assert_array_equal(np.asarray(layer.data[0]), region)
    assert layer.metadata["slide_info"]["vendor"] == "dicom"


def test_bmp_opens_in_the_viewer(make_napari_viewer, tmp_path: Path, region: np.ndarray) -> None:
    path = tmp_path / "scan.bmp"
    Image.fromarray(region).save(path)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-gpfm")
    assert layer.name == "scan"
    np.testing.assert_array_equal(np.asarray(layer.data[0]), region)


@pytest.mark.parametrize("content", [[], ["notes.txt", "fake.dcm"]], ids=["empty", "no-dicom"])
def test_a_folder_that_is_not_a_dicom_series_is_declined_silently(
    tmp_path: Path, notes: Callable[[], list[str]], content: list[str]
) -> None:
    for name in content:
        (tmp_path / name).write_bytes(b"\x00" * 300)
    assert napari_get_reader(str(tmp_path)) is None
    assert notes() == []  # napari offers every folder to every folder reader: no noise
