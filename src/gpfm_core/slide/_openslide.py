"""Slide backend for every format OpenSlide reads (Aperio, Hamamatsu, MIRAX, generic TIFF ...)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.slide._base import Slide, SlideInfo, damaged_file_error, rgba_to_rgb
from gpfm_core.slide._geometry import measure_levels
from gpfm_core.slide._ids import (
    PLAUSIBLE_MPP,
    compute_slide_id,
    float_prop,
    mpp_from_resolution,
)
from gpfm_core.slide._image import _rational

__all__ = ["OpenSlideSlide", "detect_openslide_format"]

log = logging.getLogger(__name__)

DEFAULT_TILE = 256
#: OpenSlide vendors whose files are plain TIFF pages, one per level (tags readable).
_TIFF_VENDORS = frozenset({"aperio", "generic-tiff"})
#: Extra pixels a read of a padded level may start earlier to land on a whole pixel, and
#: the level-0 rounding (in level-0 px) that counts as landing on it.
_REMAP_SEARCH = 32
#: Bases of levels whose geometry the dimensions settle alone (no tags needed).
_PLAIN = frozenset({"level 0", "dimensions"})
_REMAP_TOL = 0.02


def detect_openslide_format(path: Path) -> str | None:
    """OpenSlide's vendor name for ``path`` or None when OpenSlide cannot read it."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideSlide(Slide):
    """A slide read through ``openslide.OpenSlide`` (imported lazily)."""

    backend = "openslide"

    def __init__(
        self, path: Path, *, vendor: str, mpp_override: tuple[float, float] | None = None
    ) -> None:
        import openslide

        try:
            osr = openslide.OpenSlide(str(path))
            # listed once: a handle in OpenSlide's (sticky) error state refuses even this
            self._associated = tuple(sorted(osr.associated_images.keys()))
        except openslide.OpenSlideError as exc:
            raise damaged_file_error(
                path, f"opening it with OpenSlide ({vendor})", exc, name=_name(path, vendor)
            ) from None
        self._osr: Any = osr
        props = {str(k): str(v) for k, v in osr.properties.items()}
        n = osr.level_count
        dims = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        native = tuple(_native_tile(props, i) for i in range(n))
        tiles = tuple(t or (DEFAULT_TILE, DEFAULT_TILE) for t in native)
        meta_mpp = _mpp_from_properties(props)
        lo, hi = PLAUSIBLE_MPP
        if vendor == "generic-tiff" and meta_mpp and not lo <= meta_mpp[0] <= hi:
            # generic TIFF µm/px comes from resolution tags, often a 72/96 dpi default
            log.info("%s: ignoring implausible µm/px %s from TIFF tags", path.name, meta_mpp)
            meta_mpp = None
        mpp, source = (
            (mpp_override, "override")
            if mpp_override is not None
            else (meta_mpp, "metadata" if meta_mpp is not None else None)
        )
        info = SlideInfo(
            path=str(path.resolve()),
            slide_id=compute_slide_id(path, dims[0]),
            vendor=vendor,
            level_dimensions=dims,
            level_downsamples=tuple(float(d) for d in osr.level_downsamples),
            mpp=mpp,
            mpp_source=source,
            objective_power=float_prop(props, "openslide.objective-power"),
            tile_sizes=tiles,
            properties=props,
            backend=self.backend,
        )
        levels = measure_levels(dims, info.level_downsamples, tile_sizes=native)
        if vendor in _TIFF_VENDORS and any(g.basis not in _PLAIN for g in levels):
            # a padded or unexplained level: its own resolution tags may tell (opening
            # the file with tifffile costs time, so only then)
            resolutions = _level_resolutions(path, dims)
            levels = measure_levels(
                dims, info.level_downsamples, tile_sizes=native, resolutions=resolutions
            )
        super().__init__(replace(info, levels=levels))

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        geom = self.levels[level]
        bx = by = 0
        if geom.downsample != geom.reported_downsample:
            # OpenSlide maps level-0 (x, y) to level pixels with its own downsample (the
            # mean size ratio, far off on a padded level) and interpolates at fractional
            # positions: give it the coordinate of the true level position x / factor
            search = _REMAP_SEARCH if geom.padded else 0
            x, bx = _remap(x / geom.downsample, geom.reported_downsample, search)
            y, by = _remap(y / geom.downsample, geom.reported_downsample, search)
        img = self._osr.read_region((x, y), level, (w + bx, h + by))
        return rgba_to_rgb(np.asarray(img)[by:, bx:])

    def _decode_errors(self) -> tuple[type[BaseException], ...]:
        # OpenSlide reports every decoder failure (short read, corrupt JPEG, bad DICOM
        # frame) as OpenSlideError, and its handle stays in that error state afterwards
        import openslide

        return (openslide.OpenSlideError,)

    @property
    def associated_names(self) -> tuple[str, ...]:
        """Names of the associated images OpenSlide reports."""
        return self._associated

    def _read_associated(self, name: str) -> np.ndarray:
        return rgba_to_rgb(np.asarray(self._osr.associated_images[name].convert("RGBA")))

    def _name_in_errors(self) -> str:
        return _name(self.path, self.info.vendor)

    def _close(self) -> None:
        self._osr.close()


def _name(path: Path, vendor: str) -> str:
    """The slide as an error names it: a DICOM series by its folder (any file may be cut)."""
    if vendor == "dicom":
        return f"DICOM series {path.parent.name or path.parent}"
    return path.name


def _remap(pos: float, reported_ds: float, search: int) -> tuple[int, int]:
    """OpenSlide's level-0 coordinate for level position ``pos``, and pixels to crop.

    OpenSlide reads level pixel ``x0 / reported_ds`` for an integer level-0 ``x0`` and
    blends neighbouring pixels when that is fractional. Among starts ``pos - b``
    (``b = 0 .. search``) take the first whose level-0 coordinate maps within
    ``_REMAP_TOL`` px of it (else the closest); reading ``b`` more pixels and dropping
    them gives ``pos`` nearly unblended.

    Returns
    -------
    (int, int)
        Level-0 coordinate to pass to OpenSlide, and the number ``b`` of leading pixels
        to drop.
    """
    b = np.arange(min(search, max(0, math.floor(pos))) + 1)
    want = (pos - b) * reported_ds
    err = np.abs(want - np.rint(want))
    close = err < _REMAP_TOL
    k = int(np.argmax(close)) if close.any() else int(np.argmin(err))
    return int(np.rint(want[k])), int(b[k])


def _native_tile(props: dict[str, str], level: int) -> tuple[int, int] | None:
    """Native tile ``(width, height)`` of a level, None when OpenSlide reports none."""
    try:
        tw = int(props[f"openslide.level[{level}].tile-width"])
        th = int(props[f"openslide.level[{level}].tile-height"])
    except (KeyError, ValueError):
        return None
    return (tw, th) if tw > 0 and th > 0 else None


def _level_resolutions(
    path: Path, dims: tuple[tuple[int, int], ...]
) -> list[tuple[float, float] | None] | None:
    """Resolution tags ``(x, y)`` in pixels per centimetre of the page of every level.

    OpenSlide reports the tags of the first page only; a padded level's own tags give
    its true factor. Pages are matched to levels by size. None when the file cannot be
    read as TIFF; a None entry where a level has no (or unit-less) tags.
    """
    import tifffile

    per_cm = {2: 1 / 2.54, 3: 1.0}  # ResolutionUnit INCH, CENTIMETER
    found: dict[tuple[int, int], tuple[float, float] | None] = {}
    try:
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                size = (int(page.imagewidth), int(page.imagelength))
                if size in found or size not in dims:
                    continue
                tags = page.tags
                xr, yr, unit = (
                    tags.get(k) for k in ("XResolution", "YResolution", "ResolutionUnit")
                )
                scale = per_cm.get(int(unit.value)) if unit is not None else None
                rx = _rational(xr.value) if xr is not None else None
                ry = _rational(yr.value) if yr is not None else None
                found[size] = (rx * scale, ry * scale) if rx and ry and scale else None
    except Exception as exc:
        log.debug("%s: no per-level resolution tags (%s)", path.name, exc)
        return None
    return [found.get(d) for d in dims]


def _mpp_from_properties(props: dict[str, str]) -> tuple[float, float] | None:
    """µm/px from OpenSlide's properties, falling back to TIFF resolution tags."""
    mx = float_prop(props, "openslide.mpp-x")
    my = float_prop(props, "openslide.mpp-y")
    if mx and my:
        return (mx, my)
    if mx or my:
        v = mx or my
        return (float(v), float(v))  # type: ignore[arg-type]
    return mpp_from_resolution(
        float_prop(props, "tiff.XResolution"),
        float_prop(props, "tiff.YResolution"),
        props.get("tiff.ResolutionUnit"),
    )
