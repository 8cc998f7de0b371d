"""Stable slide identifiers and µm/px parsing shared by the slide backends."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path

from gpfm_core.errors import SlideError

__all__ = ["compute_slide_id", "mpp_from_resolution", "normalise_mpp"]

_MIB = 1 << 20

#: µm/px outside this range in *generic* resolution tags is treated as "no µm/px": 72 dpi
#: (352.8 µm/px) or 96 dpi screen defaults are not a physical pixel size of a scan.
PLAUSIBLE_MPP = (0.02, 20.0)


def compute_slide_id(path: str | os.PathLike[str], level0_size: tuple[int, int]) -> str:
    """Return a stable 16-hex identifier of a slide file's contents.

    The id is the first 16 hex digits of SHA-256 over: the file size, the first MiB,
    the last MiB and the level-0 ``(width, height)``. It does not depend on the file's
    name or folder (a renamed or copied slide keeps its id) and costs at most 2 MiB of
    reading, even for a 5 GB slide. For folder-based formats (MIRAX ``.mrxs``) only the
    index file is hashed.

    Parameters
    ----------
    path
        The slide file.
    level0_size
        ``(width, height)`` of level 0 in pixels.

    Returns
    -------
    str
        16 lowercase hexadecimal characters.
    """
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    h.update(f"gpfm-slide-id-v1:{size}:{level0_size[0]}x{level0_size[1]}:".encode())
    with p.open("rb") as fh:
        h.update(fh.read(_MIB))
        if size > _MIB:
            fh.seek(max(size - _MIB, _MIB))
            h.update(fh.read(_MIB))
    return h.hexdigest()[:16]


def normalise_mpp(
    mpp: float | tuple[float, float] | list[float] | None, *, what: str = "mpp"
) -> tuple[float, float] | None:
    """Validate a µm/px value given as one number or an ``(x, y)`` pair.

    Raises
    ------
    SlideError
        When a value is not a positive finite number.
    """
    if mpp is None:
        return None
    if isinstance(mpp, (int, float)):
        pair = (float(mpp), float(mpp))
    else:
        try:
            vals = [float(v) for v in mpp]
        except (TypeError, ValueError):
            raise SlideError(f"{what}={mpp!r} is not a number; pass e.g. {what}=0.25") from None
        if len(vals) != 2:
            raise SlideError(f"{what}={mpp!r} must be one number or an (x, y) pair")
        pair = (vals[0], vals[1])
    if not all(math.isfinite(v) and v > 0 for v in pair):
        raise SlideError(f"{what}={mpp!r} must be a positive number of µm per pixel, e.g. 0.25")
    return pair


def mpp_from_resolution(
    xres: float | None, yres: float | None, unit: str | int | None
) -> tuple[float, float] | None:
    """µm/px from TIFF resolution tags (pixels per unit), or None when absent/implausible.

    Parameters
    ----------
    xres, yres
        Pixels per ``unit`` along x and y.
    unit
        ``"centimeter"``/3, ``"inch"``/2, ``"micrometer"``; anything else gives None.
    """
    if not xres or not yres:
        return None
    key = str(unit).lower()
    um_per_unit = {
        "centimeter": 1e4,
        "3": 1e4,
        "inch": 25400.0,
        "2": 25400.0,
        "micrometer": 1.0,
        "millimeter": 1e3,
    }.get(key)
    if um_per_unit is None:
        return None
    try:
        mx, my = um_per_unit / float(xres), um_per_unit / float(yres)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    lo, hi = PLAUSIBLE_MPP
    if not (lo <= mx <= hi and lo <= my <= hi):
        return None
    return (mx, my)


def float_prop(props: Mapping[str, str], key: str) -> float | None:
    """Parse ``props[key]`` as a positive finite float, or None."""
    raw = props.get(key)
    if raw is None:
        return None
    try:
        val = float(raw)
    except ValueError:
        return None
    return val if math.isfinite(val) and val > 0 else None
