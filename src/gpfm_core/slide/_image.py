"""Slide backend for plain images (PNG, JPEG, BMP, untiled TIFF): one level, held in memory."""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpfm_core.errors import SlideError
from gpfm_core.slide._base import Slide, SlideInfo, damaged_file_error, rgba_to_rgb
from gpfm_core.slide._formats import IMAGE_SUFFIXES, TIFF_SUFFIXES
from gpfm_core.slide._ids import compute_slide_id, mpp_from_resolution

__all__ = ["IMAGE_SUFFIXES", "TIFF_SUFFIXES", "ImageSlide"]

log = logging.getLogger(__name__)

DEFAULT_TILE = 256
#: What Pillow raises for bytes it cannot decode (a truncated PNG / JPEG is an OSError).
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
#: What tifffile raises for a damaged file: its own error, short reads (``struct.error``,
#: EOFError), inconsistent tags (ValueError, IndexError, KeyError), and imagecodecs'
#: decoder errors (``Jpeg8Error``, ``ZlibError`` ..., all RuntimeError).
_TIFF_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    RuntimeError,
    NotImplementedError,
    struct.error,
)


class ImageSlide(Slide):
    """A plain image as a one-level slide; pixels are decoded once at open.

    Pillow decodes PNG/JPEG/BMP (its decompression-bomb limit of ~178 Mpx applies: larger
    images should be converted to a tiled pyramidal TIFF), tifffile decodes TIFF.
    µm/px comes from the TIFF resolution tags or the PNG/JPEG dpi when it is plausible
    for a microscope (0.02–20 µm/px; 72 or 96 dpi screen defaults are ignored).
    """

    backend = "image"

    def __init__(self, path: Path, *, mpp_override: tuple[float, float] | None = None) -> None:
        if path.suffix.lower() in TIFF_SUFFIXES:
            arr, meta_mpp, props = _load_tiff(path)
        else:
            arr, meta_mpp, props = _load_pillow(path)
        self._rgb = arr
        h, w = arr.shape[:2]
        mpp, source = (
            (mpp_override, "override")
            if mpp_override is not None
            else (meta_mpp, "metadata" if meta_mpp is not None else None)
        )
        info = SlideInfo(
            path=str(path.resolve()),
            slide_id=compute_slide_id(path, (w, h)),
            vendor="image",
            level_dimensions=((w, h),),
            level_downsamples=(1.0,),
            mpp=mpp,
            mpp_source=source,
            objective_power=None,
            tile_sizes=((DEFAULT_TILE, DEFAULT_TILE),),
            properties=props,
            backend=self.backend,
        )
        super().__init__(info)

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        ih, iw = self._rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x == 0 and y == 0 and (w, h) == (iw, ih):
            return self._rgb.copy()
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return out

    def _close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)


def _to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """Any 2-D/3-D image array -> ``(H, W, 3)`` uint8, alpha composited onto white."""
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (S, H, W)
    if arr.dtype != np.uint8:
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif np.issubdtype(arr.dtype, np.integer):
            shift = max(0, arr.dtype.itemsize * 8 - 8)
            arr = (arr.astype(np.uint64) >> shift).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
            arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
        else:
            raise SlideError(f"{name} has pixel type {arr.dtype}, which is not an image")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise SlideError(f"{name} has shape {arr.shape}, not a 2-D RGB image")
    c = arr.shape[2]
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 2:  # grey + alpha
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
        c = 4
    if c == 4:
        return rgba_to_rgb(arr)
    return np.ascontiguousarray(arr)


def _load_pillow(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, dict[str, str]]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                fmt = img.format or path.suffix.lstrip(".").upper()
                mode = img.mode
                dpi = img.info.get("dpi")
                has_alpha = mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                rgb = img.convert("RGBA" if has_alpha else "RGB")
    except Image.DecompressionBombError:
        raise SlideError(
            f"{path.name} is too large for a plain image; convert it to a tiled pyramidal "
            "TIFF (e.g. vips tiffsave in.png out.tif --tile --pyramid --compression jpeg)"
        ) from None
    except _PILLOW_ERRORS as exc:
        raise damaged_file_error(path, "decoding the image", exc) from None
    arr = _to_rgb(np.asarray(rgb), path.name)
    mpp = None
    if dpi and len(dpi) == 2:
        mpp = mpp_from_resolution(float(dpi[0]), float(dpi[1]), "inch")
    props = {"image.format": str(fmt), "image.mode": str(mode)}
    if dpi:
        props["image.dpi"] = f"{float(dpi[0]):g},{float(dpi[1]):g}"
    return arr, mpp, props


def _load_tiff(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, dict[str, str]]:
    import tifffile

    size = path.stat().st_size
    with _tifffile_problems() as problems:
        try:
            with tifffile.TiffFile(path) as tf:
                # check the structure before decoding: a cut-off file must not open as
                # fewer pages, nor decode a level 0 whose tiles lie past its end
                _check_tiff_extent(tf, size, problems)
                page = tf.pages.first
                arr = page.asarray()
                tags = page.tags
                xres = tags.get("XResolution")
                yres = tags.get("YResolution")
                unit = tags.get("ResolutionUnit")
                props = {"image.format": "TIFF", "tiff.compression": str(page.compression.name)}
                desc = tags.get("ImageDescription")
                if desc is not None:
                    props["tiff.ImageDescription"] = str(desc.value)[:2000]
        except SlideError:
            raise
        except (tifffile.TiffFileError, *_TIFF_ERRORS) as exc:
            raise damaged_file_error(path, "decoding the TIFF", exc) from None
    mpp = None
    if xres is not None and yres is not None and unit is not None:
        mpp = mpp_from_resolution(
            _rational(xres.value), _rational(yres.value), _unit_name(unit.value)
        )
    return _to_rgb(arr, path.name), mpp, props


def _check_tiff_extent(tf: object, size: int, problems: list[str]) -> None:
    """Raise when the IFD chain is cut short or a page's data lies past the file's end.

    tifffile stops at a cut-off IFD chain and only logs it (``problems`` collects what it
    logs); a page whose tiles end past ``size`` bytes decodes to an empty-input error.

    Raises
    ------
    SlideError
        One line naming the page and the byte it needs.
    """
    pages = tf.pages  # type: ignore[attr-defined]
    before = len(problems)  # a bad tag of a readable page is not a cut-off chain
    n = len(pages)  # walks the whole IFD chain
    path = Path(tf.filehandle.path)  # type: ignore[attr-defined]
    if len(problems) > before:  # e.g. "<tifffile.TiffPages @8> invalid page offset 258404"
        detail = re.sub(r"^<[^>]*>\s*", "", problems[before])
        raise damaged_file_error(
            path, f"reading TIFF page {n} ({size:,} bytes in the file)", detail
        )
    for i in range(n):
        page = pages[i]
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)]
        if ends and max(ends) > size:
            raise damaged_file_error(
                path,
                f"reading page {i}",
                f"its data runs to byte {max(ends):,} but the file has {size:,} bytes",
            )


class _ProblemFilter(logging.Filter):
    """Keeps tifffile's messages of one thread out of the log; collects its errors."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.errors: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors.append(msg)
        log.debug("tifffile: %s", msg)
        return False


@contextlib.contextmanager
def _tifffile_problems() -> Iterator[list[str]]:
    """The errors tifffile logs (not raises) in this thread while the block runs.

    They go to this module's debug log instead, so a damaged file gives the one-line
    :class:`SlideError`, not extra log lines.
    """
    logger = logging.getLogger("tifffile")
    flt = _ProblemFilter()
    logger.addFilter(flt)
    try:
        yield flt.errors
    finally:
        logger.removeFilter(flt)


def _rational(v: object) -> float | None:
    try:
        if isinstance(v, tuple):
            return float(v[0]) / float(v[1]) if v[1] else None
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _unit_name(v: object) -> str:
    return {2: "inch", 3: "centimeter"}.get(int(v), "none")  # type: ignore[call-overload]
