"""The one list of file types the library opens, and DICOM whole-slide series in folders.

Every other list is derived from these sets: :func:`~gpfm_core.slide.open_slide`'s checks,
its error messages, and the napari manifest's ``filename_patterns`` (``napari.yaml``; a test
fails when they differ, and ``make manifest`` regenerates them).

A DICOM whole-slide image (VL Whole Slide Microscopy Image Storage) is a *series*: one file
per pyramid level (plus label / overview), all in one folder. OpenSlide 4 opens the series
from any one of its files and finds the others in the same folder; :func:`dicom_series_file`
lets the folder itself stand for the slide.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "OPENSLIDE_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TIFF_SUFFIXES",
    "dicom_series_file",
    "napari_filename_patterns",
    "slide_stem",
]

#: Extensions of the formats OpenSlide reads (Aperio, Hamamatsu, Leica, MIRAX, Sakura,
#: Ventana, Philips / generic tiled TIFF, DICOM).
OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)
#: Plain images read whole through Pillow.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: TIFF files: OpenSlide when it recognises them, else read as a plain image.
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
#: Everything :func:`~gpfm_core.slide.open_slide` accepts by extension.
SUPPORTED_SUFFIXES = OPENSLIDE_SUFFIXES | IMAGE_SUFFIXES | TIFF_SUFFIXES

#: A folder is looked through for a DICOM file up to this many entries (a series has a few
#: files per level; a folder of thousands of unrelated files is not a series).
_MAX_SCAN = 4096
_DICM_OFFSET = 128  # DICOM Part 10: a 128-byte preamble, then b"DICM"


def napari_filename_patterns() -> list[str]:
    """``["*.bif", "*.bmp", ...]``: the reader's ``filename_patterns`` in ``napari.yaml``."""
    return [f"*{s}" for s in sorted(SUPPORTED_SUFFIXES)]


def _is_dicom_part10(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(_DICM_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _series_uid(path: str) -> str | None:
    import openslide

    try:
        with openslide.OpenSlide(path) as osr:
            return osr.properties.get("dicom.SeriesInstanceUID")
    except openslide.OpenSlideError:
        return None


def dicom_series_file(
    folder: str | os.PathLike[str], *, like: str | os.PathLike[str] | None = None
) -> Path | None:
    """The file that stands for the DICOM whole-slide series in ``folder``, or None.

    The first file by name (any extension: DICOM files are often named by their UID) that is a
    DICOM Part 10 file OpenSlide recognises as a whole-slide image. With ``like``, the first
    such file of ``like``'s series: so a folder and every file of its series resolve to ONE
    file, hence one path and one slide id. Sub-folders are not searched: OpenSlide reads a
    series from one folder.

    Parameters
    ----------
    folder
        A folder.
    like
        A DICOM file of the wanted series (in ``folder``).

    Returns
    -------
    Path or None
        None when the folder holds no (such) DICOM whole-slide image or cannot be listed.
    """
    import openslide

    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in itertools.islice(it, _MAX_SCAN) if e.is_file())
    except OSError:
        return None
    series = None if like is None else _series_uid(os.fspath(like))
    for name in names:
        path = os.path.join(folder, name)
        if not _is_dicom_part10(path):
            continue
        try:
            if openslide.OpenSlide.detect_format(path) != "dicom":
                continue
        except openslide.OpenSlideError:
            continue
        if series is None or _series_uid(path) == series:
            return Path(path)
    return None


def slide_stem(path: str | os.PathLike[str]) -> str:
    """The name a slide's output files take: the file's stem, or a DICOM series' folder name.

    A DICOM whole-slide image is a series of files in one folder (see
    :func:`dicom_series_file`); the folder names the slide, whichever of its files (or the
    folder itself) was given, so ``gpfm embed scan/`` and ``gpfm embed scan/label.dcm``
    write the same file. Other slides: the last suffix dropped (``CMU-1.svs`` ->
    ``CMU-1``), as TRIDENT and CLAM name their files.

    Parameters
    ----------
    path
        A slide file, a DICOM series' folder, or any file of one (``.dcm`` or a DICOM Part
        10 file named by its UID).
    """
    p = Path(path)
    if p.is_dir():
        return p.resolve().name or p.name
    suffix = p.suffix.lower()
    if suffix == ".dcm" or (suffix not in SUPPORTED_SUFFIXES and _is_dicom_part10(os.fspath(p))):
        return p.resolve().parent.name or p.stem
    return p.stem or p.name
