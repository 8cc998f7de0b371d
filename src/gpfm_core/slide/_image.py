"""Slide backend for plain images (PNG, JPEG, BMP, untiled TIFF): one level, held in memory."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from gpfm_core.errors import SlideError
from gpfm_core.slide._base import Slide, SlideInfo, rgba_to_rgb
from gpfm_core.slide._formats import IMAGE_SUFFIXES, TIFF_SUFFIXES
from gpfm_core.slide._ids import compute_slide_id, mpp_from_resolution

__all__ = ["IMAGE_SUFFIXES", "TIFF_SUFFIXES", "ImageSlide"]

log = logging.getLogger(__name__)

DEFAULT_TILE = 256


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
    except (OSError, SyntaxError, ValueError) as exc:
        raise SlideError(f"{path.name} is not a readable image ({exc}); check the file") from None
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

    try:
        with tifffile.TiffFile(path) as tf:
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
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
        raise SlideError(
            f"{path.name} is not a readable TIFF ({exc}); the file may be truncated or corrupt"
        ) from None
    mpp = None
    if xres is not None and yres is not None and unit is not None:
        mpp = mpp_from_resolution(
            _rational(xres.value), _rational(yres.value), _unit_name(unit.value)
        )
    return _to_rgb(arr, path.name), mpp, props


def _rational(v: object) -> float | None:
    try:
        if isinstance(v, tuple):
            return float(v[0]) / float(v[1]) if v[1] else None
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _unit_name(v: object) -> str:
    return {2: "inch", 3: "centimeter"}.get(int(v), "none")  # type: ignore[call-overload]
