"""The true geometry of every pyramid level, measured instead of trusted.

Some scanners pad the coarse levels of a pyramid up to whole tiles (CAMELYON16 files
are a well-known case): a level that holds ``level0 / 8`` pixels of image is stored
``512``-px-rounded larger, and OpenSlide's downsample, the mean of ``level0 / level``
over x and y, comes out as 5.07 instead of 8. Used as it is, tiles are read from the
wrong place and overviews are stretched. :func:`measure_levels` is the one place that
decides each level's factor and its useful extent (level-0 size / factor, the rest is
padding); :class:`~gpfm_core.slide.Slide` uses it for every read, and a level it cannot
explain is marked untrusted and never read.

How a level's factor is decided, first rule that applies:

1. Resolution tags (TIFF ``XResolution``/``YResolution`` of the level's page) that
   scale from level 0 by the same factor in x and y: that factor, if the level's size
   fits it (exactly, or padded to whole tiles); a size that does not fit is untrusted.
   Tags copied unchanged onto every level say nothing and are ignored.
2. An integer factor that x and y both give exactly (``size == level0 / k`` to one
   pixel). If a power of two *also* explains the size as padded, the level is
   ambiguous and untrusted.
3. The smallest power of two that is at least ``level0 / (size + 1)`` on both axes,
   when each axis is either exact or padded up to a whole number of tiles (less than
   one tile of padding).
4. Otherwise the level is untrusted: x and y disagree, it is larger than level 0, or
   its factor is fractional without tags to confirm it (it could be padding we cannot
   see). An untrusted level is skipped: reads use a finer level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LevelGeometry", "measure_levels"]

_Fit = Literal["exact", "padded"] | None

#: Relative tolerance within which x and y resolution-tag factors must agree, and within
#: which a tag factor is snapped to the nearest integer (tags are often rounded floats).
_TAG_RTOL = 0.01


@dataclass(frozen=True)
class LevelGeometry:
    """The measured geometry of one pyramid level.

    Attributes
    ----------
    level : int
        Level index in the file (OpenSlide's numbering).
    downsample : float
        True level-0 pixels per level pixel, the same along x and y (1.0 for level 0).
    size : (int, int)
        Useful ``(width, height)``: the level pixels that hold image, padding excluded.
    reported_size : (int, int)
        ``(width, height)`` as the file stores it (padding included).
    reported_downsample : float
        The downsample the backend reports (OpenSlide: mean of x and y size ratios).
    trusted : bool
        False when the level's geometry cannot be explained; it is then never read.
    basis : str
        How :attr:`downsample` was found: ``"level 0"``, ``"resolution tags"``,
        ``"dimensions"``, ``"power of two"`` or ``"untrusted"``.
    note : str
        One line for people: the padding found, or why the level is untrusted.
    """

    level: int
    downsample: float
    size: tuple[int, int]
    reported_size: tuple[int, int]
    reported_downsample: float
    trusted: bool
    basis: str
    note: str = ""

    @property
    def padding(self) -> tuple[int, int]:
        """``(x, y)`` pixels of padding beyond the useful extent."""
        return (self.reported_size[0] - self.size[0], self.reported_size[1] - self.size[1])

    @property
    def padded(self) -> bool:
        """True when the file stores more pixels than the level's useful extent."""
        return self.padding != (0, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {
            "level": self.level,
            "downsample": self.downsample,
            "size": list(self.size),
            "reported_size": list(self.reported_size),
            "reported_downsample": self.reported_downsample,
            "padding": list(self.padding),
            "trusted": self.trusted,
            "basis": self.basis,
            "note": self.note,
        }


def measure_levels(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float] | None = None,
    *,
    tile_sizes: Sequence[tuple[int, int] | None] | None = None,
    resolutions: Sequence[tuple[float, float] | None] | None = None,
) -> tuple[LevelGeometry, ...]:
    """Measure the true factor and useful extent of every level (rules in the module doc).

    Parameters
    ----------
    level_dimensions
        ``(width, height)`` of every level as the file stores it, level 0 first.
    level_downsamples
        The backend's downsample per level (kept as ``reported_downsample``; default
        the mean of the x and y size ratios, as OpenSlide computes it).
    tile_sizes
        Native tile ``(width, height)`` per level; None (or a None entry) when the level
        is not tiled, so it cannot be "padded to whole tiles".
    resolutions
        Resolution tags ``(x, y)`` in pixels per unit (one unit for all levels) per
        level, None where absent.

    Returns
    -------
    tuple of LevelGeometry
        One per level; level 0 is always trusted with factor 1.

    Examples
    --------
    A level of ``2220 x 2967 / 8`` padded to whole 256-px tiles:

    >>> g = measure_levels([(2220, 2967), (512, 512)], tile_sizes=[(256, 256)] * 2)
    >>> g[1].downsample, g[1].size, g[1].trusted
    (8.0, (277, 370), True)
    """
    dims = [(int(w), int(h)) for w, h in level_dimensions]
    if not dims:
        return ()
    w0, h0 = dims[0]
    n = len(dims)
    reported = (
        [float(d) for d in level_downsamples]
        if level_downsamples is not None
        else [(w0 / max(w, 1) + h0 / max(h, 1)) / 2 for w, h in dims]
    )
    tiles = list(tile_sizes) if tile_sizes is not None else [None] * n
    res = list(resolutions) if resolutions is not None else [None] * n
    out = [LevelGeometry(0, 1.0, dims[0], dims[0], 1.0, True, "level 0")]
    for i in range(1, n):
        tile = tiles[i] if i < len(tiles) else None
        tags = _tag_factor(res[0], res[i] if i < len(res) else None)
        out.append(_measure_one(i, dims[0], dims[i], reported[i], tile, tags))
    return tuple(out)


def _measure_one(
    i: int,
    dim0: tuple[int, int],
    dim: tuple[int, int],
    reported: float,
    tile: tuple[int, int] | None,
    tags: float | tuple[float, float] | None,
) -> LevelGeometry:
    (w0, h0), (w, h) = dim0, dim

    def make(f: float, basis: str) -> LevelGeometry:
        fits = _fits(f, dim0, dim, tile) or ("exact", "exact")
        # an exact axis keeps its stored size (floor or ceil of level0 / f, as written);
        # a padded one holds the level-0 pixels that are wholly inside the image
        size = tuple(
            n if fit == "exact" else max(1, math.floor(n0 / f + 1e-9))
            for n0, n, fit in zip(dim0, dim, fits, strict=True)
        )
        note = "" if size == (w, h) else f"padded from {size[0]}x{size[1]} to {w}x{h} px"
        return LevelGeometry(i, float(f), size, (w, h), float(reported), True, basis, note)  # type: ignore[arg-type]

    def untrusted(why: str) -> LevelGeometry:
        return LevelGeometry(
            i, float(reported), (w, h), (w, h), float(reported), False, "untrusted", why
        )

    if w < 1 or h < 1 or w > w0 or h > h0:
        return untrusted(f"{w}x{h} px is larger than level 0 ({w0}x{h0} px)")
    if isinstance(tags, tuple):
        return untrusted(f"its resolution tags scale x by {tags[0]:.4g} and y by {tags[1]:.4g}")
    if tags is not None:
        if _fits(tags, dim0, dim, tile) is not None:
            return make(tags, "resolution tags")
        return untrusted(
            f"its resolution tags give {tags:g}x but {w}x{h} px does not fit "
            f"{w0 / tags:.0f}x{h0 / tags:.0f} px"
        )
    exact_int = next(
        (
            k
            for k in sorted({round(w0 / w), round(h0 / h)})
            if k >= 1 and _fits(k, dim0, dim, None) == ("exact", "exact")
        ),
        None,
    )
    lower = max(w0 / (w + 1), h0 / (h + 1), 1.0)
    p = 2.0 ** max(1, math.ceil(math.log2(lower) - 1e-9))
    pow2 = _fits(p, dim0, dim, tile)
    pow2_padded = pow2 is not None and "padded" in pow2
    if exact_int is not None:
        if pow2_padded and p != exact_int:
            return untrusted(
                f"{w}x{h} px is {exact_int}x exactly or {p:g}x padded to whole tiles; "
                "cannot tell which"
            )
        return make(exact_int, "dimensions")
    if pow2 is not None:
        return make(p, "power of two")
    rx, ry = w0 / w, h0 / h
    if _fits(reported, dim0, dim, None) == ("exact", "exact"):
        # a fractional factor could as well be padding we cannot see (untiled level)
        return untrusted(f"{rx:.4g}x is not a whole factor and no resolution tags confirm it")
    return untrusted(
        f"{w}x{h} px fits no single factor: x gives {rx:.4g}x, y gives {ry:.4g}x "
        f"(reported {reported:.4g}x)"
    )


def _fit_axis(f: float, n0: int, n: int, tile: int | None) -> _Fit:
    """How ``n`` stored pixels hold ``n0 / f`` pixels of image: exactly, padded, or not."""
    q = n0 / f
    if abs(n - q) < 1.0 + 1e-9 or (q < 1.0 and n == 1):
        return "exact"
    if tile and tile > 0 and n > q and n % tile == 0 and n < math.ceil(q - 1e-9) + tile:
        return "padded"
    return None


def _fits(
    f: float, dim0: tuple[int, int], dim: tuple[int, int], tile: tuple[int, int] | None
) -> tuple[str, str] | None:
    """Per-axis fit of factor ``f`` (``("exact", "padded")`` ...), None if an axis does not fit."""
    tw, th = tile if tile is not None else (None, None)
    fx = _fit_axis(f, dim0[0], dim[0], tw)
    fy = _fit_axis(f, dim0[1], dim[1], th)
    if fx is None or fy is None:
        return None
    return (fx, fy)


def _tag_factor(
    r0: tuple[float, float] | None, ri: tuple[float, float] | None
) -> float | tuple[float, float] | None:
    """Level factor from resolution tags: a float, ``(fx, fy)`` when x and y disagree, or None.

    None when tags are missing or copied unchanged from level 0 (factor about 1).
    """
    if r0 is None or ri is None:
        return None
    try:
        fx, fy = float(r0[0]) / float(ri[0]), float(r0[1]) / float(ri[1])
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(fx) and math.isfinite(fy) and fx > 0 and fy > 0):
        return None
    if fx < 1 + _TAG_RTOL and fy < 1 + _TAG_RTOL:
        return None  # the level-0 tags copied onto every page
    if abs(fx - fy) > _TAG_RTOL * max(fx, fy):
        return (fx, fy)
    f = (fx + fy) / 2
    return float(round(f)) if abs(f - round(f)) <= _TAG_RTOL * f else f
