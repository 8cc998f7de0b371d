"""Slide backend for every format OpenSlide reads (Aperio, Hamamatsu, MIRAX, generic TIFF ...)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import SlideError
from gpfm_core.slide._base import Slide, SlideInfo, rgba_to_rgb
from gpfm_core.slide._ids import (
    PLAUSIBLE_MPP,
    compute_slide_id,
    float_prop,
    mpp_from_resolution,
)

__all__ = ["OpenSlideSlide", "detect_openslide_format"]

log = logging.getLogger(__name__)

DEFAULT_TILE = 256


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
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{path.name} looks like a {vendor} slide but OpenSlide cannot open it "
                f"({exc}); the file may be truncated or corrupt, copy it again"
            ) from None
        self._osr: Any = osr
        props = {str(k): str(v) for k, v in osr.properties.items()}
        n = osr.level_count
        dims = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        tiles = tuple(
            (
                int(props.get(f"openslide.level[{i}].tile-width", DEFAULT_TILE)),
                int(props.get(f"openslide.level[{i}].tile-height", DEFAULT_TILE)),
            )
            for i in range(n)
        )
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
        super().__init__(info)

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        import openslide

        try:
            img = self._osr.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"reading {self.path.name} failed at ({x}, {y}) level {level}: {exc}; "
                "the file may be truncated or corrupt"
            ) from None
        return rgba_to_rgb(np.asarray(img))

    @property
    def associated_names(self) -> tuple[str, ...]:
        """Names of the associated images OpenSlide reports."""
        return tuple(sorted(self._osr.associated_images.keys()))

    def _read_associated(self, name: str) -> np.ndarray:
        if self.closed:
            raise SlideError(f"{self.path.name} is closed; open it again with open_slide()")
        return rgba_to_rgb(np.asarray(self._osr.associated_images[name].convert("RGBA")))

    def _close(self) -> None:
        self._osr.close()


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
