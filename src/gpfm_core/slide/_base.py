"""The backend-independent :class:`Slide` base class and its :class:`SlideInfo`."""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from gpfm_core.errors import SlideError
from gpfm_core.slide._geometry import LevelGeometry, measure_levels

__all__ = ["Slide", "SlideInfo", "damaged_file_error", "rgba_to_rgb"]

log = logging.getLogger(__name__)

#: Source pixels per strip when a whole level is read for a thumbnail (bounds memory).
_STRIP_PIXELS = 1 << 23
#: A decoder's message is cut to this many characters in the one-line error.
_DETAIL_CHARS = 200


def damaged_file_error(
    path: str | os.PathLike[str],
    doing: str,
    detail: BaseException | str,
    *,
    name: str | None = None,
) -> SlideError:
    """The one-line :class:`SlideError` for a file whose bytes cannot be read or decoded.

    Every backend raises this (never its decoder's own exception) when opening or reading
    a truncated or corrupt file, so callers (the CLI, napari, the cohort runner, which
    does not retry a :class:`~gpfm_core.errors.GpfmError`) see one kind of error.

    Parameters
    ----------
    path
        The slide file.
    doing
        What failed, e.g. ``"reading level 0 at (0, 0)"``.
    detail
        The decoder's exception (its type name is kept) or a sentence.
    name
        How the message names the slide (default: the file name of ``path``).

    Returns
    -------
    SlideError
        ``"<name> looks truncated or corrupt: <doing> failed (<detail>); copy it
        again"``, one line.
    """
    if isinstance(detail, BaseException):
        kind = type(detail).__name__
        if kind == "error":  # struct.error, zlib.error ...: name the module too
            kind = f"{type(detail).__module__}.error"
        msg = " ".join(str(detail).split())
        text = f"{kind}: {msg}" if msg else kind
    else:
        text = " ".join(detail.split())
    if len(text) > _DETAIL_CHARS:
        text = text[: _DETAIL_CHARS - 1] + "…"
    return SlideError(
        f"{name or Path(path).name} looks truncated or corrupt: {doing} failed ({text}); "
        "copy it again"
    )


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of an opened slide (JSON-ready through :meth:`to_dict`).

    Attributes
    ----------
    path : str
        Absolute path of the slide file.
    slide_id : str
        16-hex content hash (see :func:`gpfm_core.slide._ids.compute_slide_id`).
    vendor : str
        OpenSlide vendor (``"aperio"``, ``"generic-tiff"`` ...) or ``"image"``.
    level_dimensions : tuple of (int, int)
        Useful ``(width, height)`` of every level, level 0 first: padding a scanner
        added to whole tiles is excluded (see :attr:`levels`).
    level_downsamples : tuple of float
        True level-0 pixels per level pixel, ``1.0`` first (measured, not the file's
        rounded value; see :func:`~gpfm_core.slide.measure_levels`).
    mpp : (float, float) or None
        µm per level-0 pixel ``(x, y)``; None when unknown.
    mpp_source : {"metadata", "override", None}
        Where :attr:`mpp` comes from.
    objective_power : float or None
        Scanner objective magnification (``openslide.objective-power``).
    tile_sizes : tuple of (int, int)
        Native tile ``(width, height)`` of every level (256 when the file is not tiled).
    properties : dict of str to str
        All key/value metadata the backend reports.
    backend : str
        ``"openslide"`` or ``"image"``.
    levels : tuple of LevelGeometry
        Each level's measured geometry: the file's own size and downsample, padding,
        whether it is trusted (an untrusted level is never read) and why.
    """

    path: str
    slide_id: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None
    mpp_source: str | None
    objective_power: float | None
    tile_sizes: tuple[tuple[int, int], ...]
    properties: dict[str, str] = field(default_factory=dict)
    backend: str = "openslide"
    levels: tuple[LevelGeometry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["tile_sizes"] = [list(x) for x in self.tile_sizes]
        d["mpp"] = list(self.mpp) if self.mpp is not None else None
        d["properties"] = dict(self.properties)
        d["levels"] = [g.to_dict() for g in self.levels]
        d["untrusted_levels"] = list(self.untrusted_levels)
        return d

    @property
    def untrusted_levels(self) -> tuple[int, ...]:
        """Indices of the levels whose geometry could not be trusted (never read)."""
        return tuple(g.level for g in self.levels if not g.trusted)


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite ``(h, w, 4)`` uint8 straight-alpha RGBA onto white -> ``(h, w, 3)`` uint8."""
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


class Slide(ABC):
    """A whole-slide image opened through one backend; use :func:`open_slide` to get one.

    Subclasses implement :meth:`_read` (and :meth:`_close`); everything else (argument
    checks, level geometry, thumbnails, level choice, µm/px, context manager) lives here.

    Parameters
    ----------
    info
        Metadata with the level sizes and downsamples *as the file reports them*; they
        are replaced by the measured geometry: ``info.levels`` when the backend measured
        it (with tile sizes and resolution tags), else
        :func:`~gpfm_core.slide.measure_levels` of the sizes alone.
    """

    backend: ClassVar[str] = ""

    def __init__(self, info: SlideInfo) -> None:
        levels = info.levels or measure_levels(info.level_dimensions, info.level_downsamples)
        for g in levels:
            if not g.trusted:
                log.info("%s: level %d is skipped: %s", Path(info.path).name, g.level, g.note)
        self._info = replace(
            info,
            level_dimensions=tuple(g.size for g in levels),
            level_downsamples=tuple(g.downsample for g in levels),
            levels=levels,
        )
        self._closed = False

    # -- metadata ---------------------------------------------------------------------
    @property
    def info(self) -> SlideInfo:
        """The slide's :class:`SlideInfo`."""
        return self._info

    @property
    def path(self) -> Path:
        """Path of the slide file."""
        return Path(self._info.path)

    @property
    def slide_id(self) -> str:
        """16-hex content hash of the slide."""
        return self._info.slide_id

    @property
    def mpp(self) -> tuple[float, float]:
        """µm per level-0 pixel ``(x, y)``.

        Raises
        ------
        SlideError
            When neither the metadata nor an override gives µm/px.
        """
        if self._info.mpp is None:
            raise SlideError(
                f"{self.path.name} has no µm/px in its metadata; pass mpp=... (CLI: --slide-mpp)"
            )
        return self._info.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self._info.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self._info.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """Useful ``(width, height)`` of every level (padding excluded)."""
        return self._info.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """True level-0 pixels per pixel of every level (measured, see :attr:`levels`)."""
        return self._info.level_downsamples

    @property
    def levels(self) -> tuple[LevelGeometry, ...]:
        """The measured geometry of every level; untrusted levels are never read."""
        return self._info.levels

    @property
    def tile_sizes(self) -> tuple[tuple[int, int], ...]:
        """Native tile ``(width, height)`` of every level."""
        return self._info.tile_sizes

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest trusted level whose downsample is ``<= downsample + 1e-3`` (0 if none)."""
        best, best_ds = 0, 1.0
        for g in self._info.levels:
            if g.trusted and best_ds < g.downsample <= downsample + 1e-3:
                best, best_ds = g.level, g.downsample
        return best

    # -- pixels -----------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region like OpenSlide, as RGB.

        Parameters
        ----------
        location
            Level-0 ``(x, y)`` of the top-left corner.
        level
            Pyramid level to read from.
        size
            ``(width, height)`` in pixels of ``level``.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB; pixels outside the slide or transparent are
            white. Level pixel ``(i, j)`` covers level-0 pixels from
            ``(i * ds, j * ds)`` with ``ds = level_downsamples[level]``, the measured factor.

        Raises
        ------
        SlideError
            The slide is closed, the level does not exist or its geometry is untrusted
            (:attr:`levels` says why; :meth:`best_level_for_downsample` never picks it),
            or the file's bytes there cannot be read or decoded (truncated or corrupt:
            see :func:`damaged_file_error`).
        """
        if self._closed:
            raise SlideError(f"{self.path.name} is closed; open it again with open_slide()")
        if not 0 <= int(level) < self.level_count:
            raise SlideError(
                f"level {level} does not exist in {self.path.name} (levels 0..{self.level_count - 1})"
            )
        geom = self._info.levels[int(level)]
        if not geom.trusted:
            raise SlideError(
                f"level {level} of {self.path.name} is untrusted ({geom.note}); "
                "read a finer level (best_level_for_downsample skips it)"
            )
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"region size must be positive, got {tuple(size)}")
        x, y = int(location[0]), int(location[1])
        try:
            return self._read(x, y, int(level), w, h)
        except SlideError:
            raise
        except self._decode_errors() as exc:
            raise self._damaged(f"reading level {level} at ({x}, {y}) size {w}x{h}", exc) from None

    def read_scaled(self, size: tuple[int, int]) -> np.ndarray:
        """The whole slide resampled to exactly ``size``.

        Reads the coarsest trusted level at or finer than the wanted scale, strip by
        strip, so memory stays bounded even for a one-level gigapixel image; the level's
        measured extent maps onto the output (its padding never shows).

        Parameters
        ----------
        size
            Output ``(width, height)``.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB.
        """
        from PIL import Image

        w, h = max(1, int(size[0])), max(1, int(size[1]))
        w0, h0 = self.dimensions
        level = self.best_level_for_downsample(min(w0 / w, h0 / h))
        lw, lh = self.level_dimensions[level]
        lds = self.level_downsamples[level]
        # level pixels covering level 0 (a level rounded down holds slightly less)
        ex, ey = min(float(lw), w0 / lds), min(float(lh), h0 / lds)
        sy = ey / h  # level rows per output row
        pad = math.ceil(sy) + 2
        rows_per_strip = max(1, int(max(64.0, _STRIP_PIXELS / lw) / sy))
        out = np.empty((h, w, 3), np.uint8)
        for r0 in range(0, h, rows_per_strip):
            r1 = min(h, r0 + rows_per_strip)
            y0f, y1f = r0 * sy, r1 * sy
            ys = max(0, math.floor(y0f) - pad)
            ye = min(lh, math.ceil(y1f) + pad)
            region = self.read_region((0, round(ys * lds)), level, (lw, ye - ys))
            if (lw, ye - ys) == (w, r1 - r0) and ys == y0f and ex == lw:
                out[r0:r1] = region
                continue
            img = Image.fromarray(region).resize(
                (w, r1 - r0),
                Image.Resampling.BILINEAR,
                box=(0.0, y0f - ys, ex, y1f - ys),
            )
            out[r0:r1] = np.asarray(img)
        return out

    def get_thumbnail(self, max_size: int | tuple[int, int] = 1024) -> np.ndarray:
        """A thumbnail fitting in ``max_size`` with the slide's aspect ratio.

        Parameters
        ----------
        max_size
            Largest ``(width, height)``, or one number for both.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB with ``w <= max_w`` and ``h <= max_h``.
        """
        mw, mh = (max_size, max_size) if isinstance(max_size, (int, float)) else max_size
        w0, h0 = self.dimensions
        scale = min(mw / w0, mh / h0, 1.0)
        return self.read_scaled((max(1, round(w0 * scale)), max(1, round(h0 * scale))))

    @property
    def associated_names(self) -> tuple[str, ...]:
        """Names of the associated images (``"label"``, ``"macro"``, ``"thumbnail"`` ...)."""
        return ()

    def _name_in_errors(self) -> str:
        """How a damaged-file error names the slide: its file name."""
        return self.path.name

    def _damaged(self, doing: str, exc: BaseException) -> SlideError:
        return damaged_file_error(self.path, doing, exc, name=self._name_in_errors())

    def read_associated(self, name: str) -> np.ndarray:
        """An associated image as ``(h, w, 3)`` uint8 RGB.

        Labels and macro images may show patient identifiers: do not publish them.

        Raises
        ------
        SlideError
            When the slide has no associated image called ``name``, or it cannot be
            decoded (the file is truncated or corrupt).
        """
        if self._closed:
            raise SlideError(f"{self.path.name} is closed; open it again with open_slide()")
        if name not in self.associated_names:
            have = ", ".join(self.associated_names) or "none"
            raise SlideError(f"{self.path.name} has no associated image {name!r} (has: {have})")
        try:
            return self._read_associated(name)
        except SlideError:
            raise
        except self._decode_errors() as exc:
            raise self._damaged(f"reading the associated image {name!r}", exc) from None

    def _read_associated(self, name: str) -> np.ndarray:
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle; further reads raise :class:`SlideError`."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = "unknown" if self._info.mpp is None else f"{self._info.mpp[0]:.4g}"
        state = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} {self.path.name!r} {w}x{h} levels={self.level_count} "
            f"mpp={mpp} vendor={self._info.vendor}{state}>"
        )

    # -- backend hooks ----------------------------------------------------------------
    @abstractmethod
    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """Return ``(h, w, 3)`` uint8 RGB for a checked request."""

    def _decode_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions of the backend's decoder that mean the file's bytes are damaged.

        :meth:`read_region` and :meth:`read_associated` turn them into one-line
        :class:`SlideError` (:func:`damaged_file_error`); none by default.
        """
        return ()

    def _name_in_errors(self) -> str:
        """How a damaged-file error names the slide: its file name."""
        return self.path.name

    def _damaged(self, doing: str, exc: BaseException) -> SlideError:
        return damaged_file_error(self.path, doing, exc, name=self._name_in_errors())

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources."""
