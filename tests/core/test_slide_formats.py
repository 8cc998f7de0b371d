"""Every format the library lists opens; a DICOM whole-slide series opens as a folder or any file.

The DICOM series is written in code with pydicom from a region of the real CMU sample (two
pyramid levels and a label, uncompressed, so pixels are exact) and read back through the real
OpenSlide 4 DICOM backend.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _dicom_wsi import write_dicom_wsi
from gpfm_core.errors import SlideError
from gpfm_core.slide import SUPPORTED_SUFFIXES, dicom_series_file, open_slide
from gpfm_core.slide._formats import IMAGE_SUFFIXES, OPENSLIDE_SUFFIXES, TIFF_SUFFIXES

W, H = 768, 512  # level 0 of the series: 3 x 2 tiles of 256


@pytest.fixture(scope="module")
def region(cmu_svs: Path) -> np.ndarray:
    with open_slide(cmu_svs) as s:
        return s.read_region((700, 1100), 0, (W, H))  # tissue in the sample's middle


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, region: np.ndarray) -> list[Path]:
    return write_dicom_wsi(tmp_path_factory.mktemp("dicom") / "S01-HE", region, mpp=0.499)


def test_the_one_list_is_what_open_slide_uses() -> None:
    assert {".dcm", ".bmp", ".svs", ".ndpi", ".mrxs", ".png"} <= SUPPORTED_SUFFIXES
    assert SUPPORTED_SUFFIXES == OPENSLIDE_SUFFIXES | IMAGE_SUFFIXES | TIFF_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in SUPPORTED_SUFFIXES)


def test_dicom_series_folder_opens_with_exact_pixels(
    series: list[Path], region: np.ndarray
) -> None:
    folder = series[0].parent
    with open_slide(folder) as s:
        assert s.info.vendor == "dicom" and s.backend == "openslide"
        assert s.level_dimensions == ((W, H), (W // 2, H // 2))
        assert s.level_downsamples == pytest.approx((1.0, 2.0))
        assert s.mpp == pytest.approx((0.499, 0.499)) and s.info.mpp_source == "metadata"
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (W, H)), region)
        np.testing.assert_array_equal(
            s.read_region((256, 128), 0, (300, 200)), region[128:328, 256:556]
        )
        want = region.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3)).round()
        np.testing.assert_array_equal(s.read_region((0, 0), 1, (W // 2, H // 2)), want)
        assert "label" in s.associated_names
        assert s.read_associated("label").shape == (64, 160, 3)


@pytest.mark.parametrize("member", [0, 1, 2], ids=["level0", "level1", "label"])
def test_any_file_of_the_series_is_the_same_slide(series: list[Path], member: int) -> None:
    folder = series[0].parent
    first = folder / "label.dcm"  # the series' first file by name stands for it
    assert dicom_series_file(folder) == first
    with open_slide(folder) as whole, open_slide(series[member]) as part:
        assert part.path == whole.path == first.resolve()
        assert part.slide_id == whole.slide_id
        assert part.level_dimensions == whole.level_dimensions


def test_dicom_files_named_by_uid_without_extension(tmp_path: Path, region: np.ndarray) -> None:
    names = ("1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.2", "1.2.826.0.1.3680043.2.3")
    paths = write_dicom_wsi(tmp_path / "scan", region, mpp=0.25, names=names)
    assert dicom_series_file(tmp_path / "scan") == paths[0]
    with open_slide(tmp_path / "scan") as s:
        assert s.info.vendor == "dicom" and s.level_count == 2


def test_two_series_in_one_folder_open_the_series_of_the_file_given(
    tmp_path: Path, region: np.ndarray
) -> None:
    a = write_dicom_wsi(tmp_path / "a", region, mpp=0.5, label=False)
    b = write_dicom_wsi(tmp_path / "b", region[:256, :512], mpp=0.5, label=False)
    both = tmp_path / "both"
    both.mkdir()
    for i, p in enumerate(a):
        shutil.copy(p, both / f"a{i}.dcm")
    for i, p in enumerate(b):
        shutil.copy(p, both / f"b{i}.dcm")
    with open_slide(both / "b1.dcm") as s:
        assert s.path == (both / "b0.dcm").resolve() and s.level_dimensions[0] == (512, 256)
    with open_slide(both / "a1.dcm") as s:
        assert s.path == (both / "a0.dcm").resolve() and s.level_dimensions[0] == (W, H)


@pytest.mark.parametrize(
    "content",
    [
        [],
        ["notes.txt", "image.png"],
        ["not_dicom.dcm"],  # a .dcm that is not DICOM: no DICM marker
        ["ct.dcm"],  # a DICOM file of another kind (not a whole-slide image)
    ],
    ids=["empty", "other-files", "fake-dcm", "non-wsi-dicom"],
)
def test_a_folder_without_a_dicom_wsi_is_one_clear_error(
    tmp_path: Path, content: list[str]
) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    for name in content:
        if name == "image.png":
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name)
        elif name == "ct.dcm":
            _write_ct(folder / name)
        else:
            (folder / name).write_bytes(b"\x00" * 200)
    assert dicom_series_file(folder) is None
    with pytest.raises(SlideError, match="folder without a DICOM whole-slide image") as err:
        open_slide(folder)
    assert "\n" not in str(err.value)


def _write_ct(path: Path) -> None:
    """A valid DICOM Part 10 file of a CT slice: DICOM, but not a whole-slide image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.save_as(path, enforce_file_format=True)


def test_bmp_opens(tmp_path: Path, region: np.ndarray) -> None:
    path = tmp_path / "scan.bmp"
    Image.fromarray(region).save(path)
    with open_slide(path, mpp=0.5) as s:
        assert s.backend != "openslide" and s.level_dimensions[0] == (W, H)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (W, H)), region)


def test_a_dicom_series_is_named_after_its_folder_whichever_file_is_given(
    series: list[Path], tmp_path: Path, region: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpfm_core.cli import main
    from gpfm_core.slide import slide_stem

    folder = series[0].parent  # .../S01-HE: level0.dcm, level1.dcm, label.dcm
    assert {slide_stem(p) for p in [folder, *series]} == {"S01-HE"}
    uid = write_dicom_wsi(tmp_path / "scan-7", region, mpp=0.5, names=("1.2.3.4", "1.2.3.5", "1.2.3.6"))
    assert slide_stem(uid[1]) == "scan-7"  # files named by UID ("suffix" .5): the folder too
    assert slide_stem(tmp_path / "CMU-1.svs") == "CMU-1"

    out = tmp_path / "emb"
    args = ["--encoder", "tiny-vit", "--mpp", "1", "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(["embed", str(folder / "label.dcm"), *args]) == 0  # the series' first file
    first = capsys.readouterr().out
    (h5,) = out.rglob("*.h5")
    assert h5.name == "S01-HE.h5" and f"-> {h5}" in first
    for given in (folder, series[1]):  # the folder, and another file of the series
        assert main(["embed", str(given), *args]) == 0
        assert f"-> {h5} " in capsys.readouterr().out  # the same file, reused
    assert [p.name for p in out.rglob("*.h5")] == ["S01-HE.h5"]
    assert main(["tiles", str(series[1]), "--mpp", "1", "--tile-px", "112", "--out", str(tmp_path / "t")]) == 0
    assert [p.name for p in (tmp_path / "t").rglob("*.h5")] == ["S01-HE_patches.h5"]
