"""Whole-slide image I/O behind one :class:`Slide` interface.

>>> from gpfm_core.slide import open_slide
>>> with open_slide("CMU-1.svs") as slide:          # doctest: +SKIP
...     rgb = slide.read_region((0, 0), 0, (512, 512))   # (512, 512, 3) uint8

Backends: :class:`OpenSlideSlide` for every format OpenSlide reads, :class:`ImageSlide`
for plain PNG/JPEG/BMP/untiled TIFF. :func:`open_slide` picks one and turns every
problem with the file into a one-line :class:`~gpfm_core.errors.SlideError`.

Level geometry is measured, not trusted (:func:`measure_levels`): a coarse level padded
to whole tiles is read with its true factor and without its padding, and a level whose
geometry cannot be explained is skipped (``Slide.levels`` says why).
"""

from __future__ import annotations

import os
from pathlib import Path

from gpfm_core.errors import SlideError
from gpfm_core.slide._base import Slide, SlideInfo, rgba_to_rgb
from gpfm_core.slide._formats import (
    IMAGE_SUFFIXES,
    OPENSLIDE_SUFFIXES,
    SUPPORTED_SUFFIXES,
    TIFF_SUFFIXES,
    dicom_series_file,
    slide_stem,
)
from gpfm_core.slide._geometry import LevelGeometry, measure_levels
from gpfm_core.slide._ids import compute_slide_id, normalise_mpp
from gpfm_core.slide._image import ImageSlide
from gpfm_core.slide._openslide import OpenSlideSlide, detect_openslide_format

__all__ = [
    "OPENSLIDE_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "ImageSlide",
    "LevelGeometry",
    "OpenSlideSlide",
    "Slide",
    "SlideInfo",
    "compute_slide_id",
    "dicom_series_file",
    "measure_levels",
    "open_slide",
    "rgba_to_rgb",
    "slide_stem",
]


def open_slide(
    path: str | os.PathLike[str], *, mpp: float | tuple[float, float] | None = None
) -> Slide:
    """Open a whole-slide image or plain image.

    Parameters
    ----------
    path
        Slide file (``.svs``, ``.ndpi``, ``.mrxs``, pyramidal ``.tif`` ..., or
        ``.png``/``.jpg``/``.bmp``/plain ``.tif``), or a DICOM whole-slide series: its
        folder or any file in it (both open the series through the same file, see
        :func:`~gpfm_core.slide._formats.dicom_series_file`).
    mpp
        µm per level-0 pixel, one number or ``(x, y)``; wins over the metadata and
        ``info.mpp_source`` becomes ``"override"``.

    Returns
    -------
    Slide
        Close it with :meth:`Slide.close` or use it as a context manager.

    Raises
    ------
    SlideError
        Missing path, a folder, an empty / truncated / corrupt file, an unsupported format,
        or a bad ``mpp``; the message is one line naming the fix.
    """
    p = Path(path).expanduser()
    override = normalise_mpp(mpp)
    if not p.exists():
        raise SlideError(f"{p} does not exist; check the path")
    if p.is_dir():
        series = dicom_series_file(p)
        if series is None:
            raise SlideError(
                f"{p} is a folder without a DICOM whole-slide image; pass the slide file itself"
            )
        p = series
    try:
        size = p.stat().st_size
        with p.open("rb"):
            pass
    except OSError as exc:
        raise SlideError(f"{p} cannot be opened ({exc.strerror}); check its permissions") from None
    if size == 0:
        raise SlideError(f"{p} is empty (0 bytes); copy the slide again")
    suffix = p.suffix.lower()
    vendor = detect_openslide_format(p)
    if vendor == "dicom":  # any file of a series: open it through the series' first file
        p = dicom_series_file(p.parent, like=p) or p
    if vendor is not None:
        return OpenSlideSlide(p, vendor=vendor, mpp_override=override)
    if suffix in IMAGE_SUFFIXES or suffix in TIFF_SUFFIXES:
        return ImageSlide(p, mpp_override=override)
    if suffix in OPENSLIDE_SUFFIXES:
        raise SlideError(
            f"{p.name} is not a readable {suffix} slide: OpenSlide does not recognise it, "
            "so it is truncated, corrupt or not a slide; copy it again"
        )
    known = " ".join(sorted(SUPPORTED_SUFFIXES))
    raise SlideError(
        f"{p.name}: unsupported format {suffix or '(no extension)'!r}; use one of {known}"
    )
