"""A slide as a lazy multiscale pyramid napari can show without reading full resolution.

Each level is a :class:`SlideLevelArray` (an array-like whose ``__getitem__`` calls
``Slide.read_region`` for just the requested window), wrapped by default in a dask array
whose chunks are whole multiples of the file's native tiles (at least 512 px), so one
chunk = a few native tile decodes. Levels the file lacks (a one-level SVS, a PNG) are
added as *virtual* levels, each chunk read from the best native level and averaged down
in that chunk alone: the overview never touches the full-resolution image as a whole.

Native levels come from the slide's measured geometry (``Slide.levels``): each has its
true factor and its useful size, so a level the scanner padded to whole tiles is neither
stretched nor shows its padding, and an untrusted level is left out (the next virtual
level is averaged down from a finer, trusted one).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gpfm_core.errors import GpfmError
from gpfm_core.slide import Slide

__all__ = [
    "MAX_OVERVIEW_PX",
    "MIN_CHUNK_PX",
    "SlideLevelArray",
    "SlidePyramid",
    "build_pyramid",
    "chunk_size",
]

log = logging.getLogger(__name__)

#: The coarsest level napari gets is at most this many pixels on its longest side.
MAX_OVERVIEW_PX = 1024
#: Chunks are the smallest multiple of the native tile that reaches this size.
MIN_CHUNK_PX = 512
#: Source pixels read at once when a virtual level is averaged down (bounds memory).
_BAND_PIXELS = 1 << 24


def chunk_size(tile: int, *, minimum: int = MIN_CHUNK_PX) -> int:
    """Smallest multiple of ``tile`` that is ``>= minimum``.

    Parameters
    ----------
    tile
        Native tile edge in pixels (>= 1).
    minimum
        Smallest chunk edge wanted.

    Returns
    -------
    int
        ``tile * ceil(minimum / tile)``.
    """
    tile = max(1, int(tile))
    return tile * max(1, math.ceil(minimum / tile))


class SlideLevelArray:
    """Lazy ``(H, W, 3)`` uint8 view of one pyramid level of a :class:`Slide`.

    Indexing reads only the requested window (``read_region`` at the native level; for a
    virtual level, a read at the best native level averaged down by the integer ratio).
    Reads are thread-safe as far as the backend is (OpenSlide is). A failed read (a
    truncated file) returns white and calls ``on_error`` once per pyramid.

    Parameters
    ----------
    slide
        The open slide; it must outlive the array.
    downsample
        Level-0 pixels per pixel of this level.
    shape
        ``(H, W)`` of this level.
    on_error
        Called with the error message of the first failed read.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(
        self,
        slide: Slide,
        *,
        downsample: float,
        shape: tuple[int, int],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.slide = slide
        self.downsample = float(downsample)
        self.shape = (int(shape[0]), int(shape[1]), 3)
        self.source_level = slide.best_level_for_downsample(self.downsample)
        src_ds = slide.level_downsamples[self.source_level]
        ratio = self.downsample / src_ds
        self.ratio = round(ratio) if abs(ratio - round(ratio)) < 1e-3 else ratio
        self._on_error = on_error

    @property
    def is_virtual(self) -> bool:
        """True when this level does not exist in the file and is averaged down."""
        return self.ratio != 1

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __deepcopy__(self, memo: dict[int, Any]) -> SlideLevelArray:
        # Read-only view of a file: napari's "duplicate layer" deep-copies layer data.
        return self

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            key = _expand_ellipsis(key)
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3:
            raise IndexError(f"too many indices for a (H, W, 3) slide level: {key!r}")
        ys, xs, cs = key
        (y0, y1, sy), y_int = _bounds(ys, self.shape[0])
        (x0, x1, sx), x_int = _bounds(xs, self.shape[1])
        if y1 <= y0 or x1 <= x0:
            out = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        else:
            out = self.read_window(y0, y1, x0, x1)
        out = out[::sy, ::sx]
        if y_int and x_int:
            out = out[0, 0]
        elif y_int:
            out = out[0]
        elif x_int:
            out = out[:, 0]
        return out[..., cs]

    def read_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of this level.

        Returns
        -------
        numpy.ndarray
            ``(y1 - y0, x1 - x0, 3)`` uint8 RGB (white where unreadable).
        """
        h, w = y1 - y0, x1 - x0
        try:
            if not self.is_virtual:
                loc = (round(x0 * self.downsample), round(y0 * self.downsample))
                return self.slide.read_region(loc, self.source_level, (w, h))
            return self._read_virtual(y0, y1, x0, x1)
        except (GpfmError, OSError) as exc:
            log.warning("read failed for %s: %s", self.slide.path.name, exc)
            if self._on_error is not None:
                self._on_error(str(exc))
            return np.full((h, w, 3), 255, np.uint8)

    def _read_virtual(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        h, w = y1 - y0, x1 - x0
        out = np.empty((h, w, 3), np.uint8)
        r = self.ratio
        src_ds = self.slide.level_downsamples[self.source_level]
        rows = max(1, int(_BAND_PIXELS / max(1.0, w * r * r)))
        for b0 in range(0, h, rows):
            b1 = min(h, b0 + rows)
            if isinstance(r, int):
                sw, sh = w * r, (b1 - b0) * r
                loc = (round(x0 * self.downsample), round((y0 + b0) * self.downsample))
                src = self.slide.read_region(loc, self.source_level, (sw, sh))
                blocks = src.reshape(b1 - b0, r, w, r, 3).astype(np.uint32).sum(axis=(1, 3))
                out[b0:b1] = ((blocks + (r * r) // 2) // (r * r)).astype(np.uint8)
            else:
                out[b0:b1] = self._resample(y0 + b0, y0 + b1, x0, x1, float(r), src_ds)
        return out

    def _resample(self, y0: int, y1: int, x0: int, x1: int, r: float, src_ds: float) -> np.ndarray:
        from PIL import Image

        sx0, sy0 = math.floor(x0 * r), math.floor(y0 * r)
        sx1, sy1 = math.ceil(x1 * r), math.ceil(y1 * r)
        loc = (round(sx0 * src_ds), round(sy0 * src_ds))
        src = self.slide.read_region(loc, self.source_level, (sx1 - sx0, sy1 - sy0))
        box = (x0 * r - sx0, y0 * r - sy0, x1 * r - sx0, y1 * r - sy0)
        img = Image.fromarray(src).resize((x1 - x0, y1 - y0), Image.Resampling.BOX, box=box)
        return np.asarray(img)

    def __repr__(self) -> str:
        kind = "virtual" if self.is_virtual else "native"
        return (
            f"<SlideLevelArray {self.shape} ds={self.downsample:g} {kind} "
            f"from level {self.source_level}>"
        )


def _expand_ellipsis(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """Replace the (first) ``...`` in ``key`` by as many full slices as 3 axes need."""
    i = next(j for j, k in enumerate(key) if k is Ellipsis)
    rest = tuple(k for k in key[i + 1 :] if k is not Ellipsis)
    fill = (slice(None),) * max(0, 3 - i - len(rest))
    return key[:i] + fill + rest


def _bounds(k: Any, n: int) -> tuple[tuple[int, int, int], bool]:
    """``(start, stop, step)`` for an int or slice ``k`` along an axis of length ``n``."""
    if isinstance(k, (int, np.integer)):
        i = int(k) + n if int(k) < 0 else int(k)
        if not 0 <= i < n:
            raise IndexError(f"index {k} out of range for axis of size {n}")
        return (i, i + 1, 1), True
    if isinstance(k, slice):
        start, stop, step = k.indices(n)
        if step < 1:
            raise IndexError("negative steps are not supported on slide levels")
        return (start, max(start, stop), step), False
    raise IndexError(f"unsupported index {k!r} on a slide level (use ints or slices)")


@dataclass
class SlidePyramid:
    """Levels of a slide for ``viewer.add_image(levels, multiscale=True, rgb=True)``.

    Attributes
    ----------
    levels : list
        ``(H_i, W_i, 3)`` uint8 arrays (dask or :class:`SlideLevelArray`), finest first.
    arrays : list of SlideLevelArray
        The underlying lazy readers, one per level.
    downsamples : list of float
        Level-0 pixels per pixel of each level.
    chunks : list of (int, int)
        ``(rows, cols)`` chunk shape of each level.
    """

    levels: list[Any]
    arrays: list[SlideLevelArray]
    downsamples: list[float]
    chunks: list[tuple[int, int]]


def build_pyramid(
    slide: Slide,
    *,
    backend: Literal["dask", "array"] = "dask",
    max_overview_px: int = MAX_OVERVIEW_PX,
    min_chunk_px: int = MIN_CHUNK_PX,
    on_error: Callable[[str], None] | None = None,
) -> SlidePyramid:
    """Lazy multiscale pyramid of ``slide``: native levels, then virtual 2x levels.

    Parameters
    ----------
    slide
        An open slide.
    backend
        ``"dask"`` (default: dask arrays chunked on native tiles) or ``"array"`` (the bare
        :class:`SlideLevelArray` objects, one ``read_region`` per napari request).
    max_overview_px
        Virtual levels are added (2x each) until the coarsest level's longest side is at
        most this.
    min_chunk_px
        Smallest chunk edge; chunks are multiples of the native tile size.
    on_error
        Called once with the message of the first failed read (reads then give white).

    Returns
    -------
    SlidePyramid
        Level 0 is ``(h0, w0, 3)``; each next level is smaller, ``(H_i, W_i)`` about
        ``(h0, w0) / downsample_i`` (the trusted native levels, padding excluded).
    """
    w0, h0 = slide.dimensions
    once = _Once(on_error)
    specs: list[tuple[float, tuple[int, int]]] = []
    last = (h0 + 1, w0 + 1)
    for geom in slide.levels:
        lw, lh = geom.size
        if geom.trusted and (not specs or (lh < last[0] and lw < last[1])):
            specs.append((float(geom.downsample), (int(lh), int(lw))))
            last = (lh, lw)
    while max(specs[-1][1]) > max_overview_px:
        ds = specs[-1][0] * 2.0
        specs.append((ds, (max(1, math.ceil(h0 / ds)), max(1, math.ceil(w0 / ds)))))
    arrays = [
        SlideLevelArray(slide, downsample=ds, shape=shape, on_error=once) for ds, shape in specs
    ]
    chunks: list[tuple[int, int]] = []
    levels: list[Any] = []
    for i, arr in enumerate(arrays):
        tw, th = slide.tile_sizes[arr.source_level]
        cy = min(chunk_size(th, minimum=min_chunk_px), arr.shape[0])
        cx = min(chunk_size(tw, minimum=min_chunk_px), arr.shape[1])
        chunks.append((cy, cx))
        if backend == "dask":
            levels.append(
                _to_dask(arr, (cy, cx), name=f"gpfm-{slide.slide_id}-{i}-{arr.downsample:g}")
            )
        elif backend == "array":
            levels.append(arr)
        else:
            raise ValueError(f"backend must be 'dask' or 'array', got {backend!r}")
    log.debug("pyramid of %s: %s", slide.path.name, arrays)
    return SlidePyramid(
        levels=levels, arrays=arrays, downsamples=[s[0] for s in specs], chunks=chunks
    )


def _to_dask(arr: SlideLevelArray, chunks: tuple[int, int], *, name: str) -> Any:
    import dask.array as da

    return da.from_array(
        arr,
        chunks=(chunks[0], chunks[1], 3),
        name=name,
        asarray=False,
        fancy=False,
        lock=False,
        inline_array=True,
        meta=np.empty((0, 0, 3), np.uint8),
    )


class _Once:
    """Call ``fn`` with the first message only (thread-safe)."""

    def __init__(self, fn: Callable[[str], None] | None) -> None:
        self._fn = fn
        self._done = False
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            if self._done or self._fn is None:
                return
            self._done = True
        self._fn(message)
