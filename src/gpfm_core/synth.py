"""Synthetic whole-slide images: tiled, JPEG-compressed, pyramidal Aperio-style TIFFs.

The image is a mosaic of real H&E texture (the sample images, flipped and rotated)
under a smooth random tissue mask, so tissue detection has islands, holes and white
glass to work on. Tiles are rendered on the fly from a small *plan* (one texture
choice per block, a coarse noise field for the mask), so a 100,000 × 100,000 px slide
is written in bounded memory; lower levels are rendered from down-sampled sources with
the same plan rather than read back from level 0.

OpenSlide reads the result with its ``aperio`` driver: the first page carries an
``Aperio Image Library`` description with ``MPP`` and ``AppMag``.

:func:`write_pyramid_tiff` writes a small image held in memory as a pyramid with the
field's quirks on demand: coarse levels padded up to whole tiles (as CAMELYON16 files
are), per-level resolution tags or none, non-square pixels, levels scaled differently in
x and y. Tests build their odd slides with it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gpfm_core._atomic import atomic_path
from gpfm_core.errors import SlideError

__all__ = ["make_synthetic_slide", "write_pyramid_tiff"]

log = logging.getLogger(__name__)

#: Level-0 size of one texture block of the mosaic plan.
BLOCK = 1024
#: Level-0 size of one cell of the tissue-mask noise field.
CELL = 256
#: µm/px assumed for a source image without metadata (a 20x scan).
DEFAULT_SOURCE_MPP = 0.5
_BACKGROUND = np.array([243, 242, 246], np.uint8)


@dataclass(frozen=True)
class _Plan:
    """Everything that decides the image; tiny compared with the image."""

    width: int
    height: int
    field: np.ndarray  # (rows, cols) float32 smooth noise, one value per CELL px
    threshold: float
    choice: np.ndarray  # (brows, bcols, 4) int64: source, transform, ox, oy (level-0 px)


def _default_sources() -> list[Path]:
    raw = os.environ.get("GPFM_DATA_DIR")
    found: list[Path] = []
    if raw:
        for name in ("cmu_small_region.svs", "he_patch_1000.png"):
            if (Path(raw) / name).is_file():
                found.append(Path(raw) / name)
    if not found:
        raise SlideError(
            "no tissue images to mosaic: set GPFM_DATA_DIR to the sample-data folder "
            "or pass sources=[...] (CLI: --source)"
        )
    return found


def _load_sources(
    sources: Sequence[str | os.PathLike[str]], mpp: float, need: int
) -> list[np.ndarray]:
    """Read each source and resample it to ``mpp`` µm/px -> list of (h, w, 3) uint8.

    Only a central window of about ``need`` px (at the target resolution) is read, so a
    small slide does not pay for decoding and resampling a large source.
    """
    from PIL import Image

    from gpfm_core.slide import open_slide

    out = []
    for src in sources:
        with open_slide(src) as s:
            smpp = s.info.mpp[0] if s.info.mpp is not None else DEFAULT_SOURCE_MPP
            f = float(np.clip(smpp / mpp, 0.25, 4.0))  # target px per source px
            w, h = s.dimensions
            cw, ch = min(w, math.ceil(need / f)), min(h, math.ceil(need / f))
            rgb = s.read_region(((w - cw) // 2, (h - ch) // 2), 0, (cw, ch))
        size = (max(BLOCK, round(cw * f)), max(BLOCK, round(ch * f)))
        out.append(np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)))
    return out


def _make_plan(
    width: int, height: int, sources: list[np.ndarray], rng: np.random.Generator
) -> _Plan:
    from scipy import ndimage

    rows, cols = math.ceil(height / CELL) + 2, math.ceil(width / CELL) + 2
    noise = rng.standard_normal((rows, cols)).astype(np.float32)
    sigma = max(1.5, min(rows, cols) / 10)  # a few islands whatever the size
    field = ndimage.gaussian_filter(noise, sigma, mode="reflect")
    field /= field.std() + 1e-6
    # a margin of glass along the border, like a real slide
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    edge = np.minimum.reduce([yy, xx, rows - 1 - yy, cols - 1 - xx]) / max(2.0, sigma)
    field = field - np.clip(1.0 - edge, 0, 1) * 8.0
    threshold = float(np.quantile(field, 0.45))
    brows, bcols = math.ceil(height / BLOCK), math.ceil(width / BLOCK)
    choice = np.empty((brows, bcols, 4), np.int64)
    choice[..., 0] = rng.integers(0, len(sources), (brows, bcols))
    choice[..., 1] = rng.integers(0, 4, (brows, bcols))
    for i, src in enumerate(sources):
        sel = choice[..., 0] == i
        h, w = src.shape[:2]
        choice[..., 2][sel] = rng.integers(0, w - BLOCK + 1, int(sel.sum()))
        choice[..., 3][sel] = rng.integers(0, h - BLOCK + 1, int(sel.sum()))
    return _Plan(width, height, field.astype(np.float32), threshold, choice)


def _orient(srcs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each source with a C-contiguous transposed copy (fast rotated/flipped block copies)."""
    return [(s, np.ascontiguousarray(s.transpose(1, 0, 2))) for s in srcs]


def _block(pair: tuple[np.ndarray, np.ndarray], t: int, sx: int, sy: int, b: int) -> np.ndarray:
    """A ``(b, b, 3)`` view of a source block in orientation ``t``.

    ``t`` bit 0 flips vertically, bit 1 transposes: identity, vertical flip, transpose
    and 90° rotation, all copied row by row (column-reversing views copy ~40x slower).
    """
    a = pair[1][sx : sx + b, sy : sy + b] if t & 2 else pair[0][sy : sy + b, sx : sx + b]
    return a[::-1] if t & 1 else a


def _interp_axis(start: int, n: int, ds: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell indices and weights for pixel centres ``start..start+n`` of a level."""
    g = (start + np.arange(n) + 0.5) * ds / CELL - 0.5
    i0 = np.clip(np.floor(g).astype(np.int64), 0, size - 2)
    return i0, np.clip(g - i0, 0.0, 1.0).astype(np.float32)


def _alpha(plan: _Plan, ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Tissue opacity of level pixels ``[y, y+h) x [x, x+w)`` -> ``(h, w)`` uint16 in 0..256."""
    iy, wy = _interp_axis(y, h, ds, plan.field.shape[0])
    ix, wx = _interp_axis(x, w, ds, plan.field.shape[1])
    r0, c0 = int(iy.min()), int(ix.min())
    f = plan.field[r0 : int(iy.max()) + 2, c0 : int(ix.max()) + 2]
    iy, ix = iy - r0, ix - c0
    rows = f[iy] * (1 - wy)[:, None] + f[iy + 1] * wy[:, None]  # (h, cols)
    val = rows[:, ix] * (1 - wx) + rows[:, ix + 1] * wx  # (h, w)
    soft = 0.08 * max(1.0, ds / 4)  # a few px of soft edge at every level
    return np.clip((val - plan.threshold) * (256 / soft) + 128.5, 0, 256).astype(np.uint16)


def _render_tile(
    plan: _Plan,
    srcs: list[tuple[np.ndarray, np.ndarray]],
    ds: int,
    x: int,
    y: int,
    tile: int,
    lsize: tuple[int, int],
) -> np.ndarray:
    """Render level pixels ``[y, y+tile) x [x, x+tile)`` -> ``(tile, tile, 3)`` uint8."""
    lw, lh = lsize
    w, h = min(tile, lw - x), min(tile, lh - y)
    out = _glass(tile).copy()
    # bilinear values lie between the cell values around the tile: decide cheaply
    # whether the tile is all glass or all tissue before computing per-pixel opacity
    r0, r1 = int(y * ds / CELL - 0.5), int((y + h) * ds / CELL + 0.5) + 1
    c0, c1 = int(x * ds / CELL - 0.5), int((x + w) * ds / CELL + 0.5) + 1
    cells = plan.field[max(0, r0) : r1 + 1, max(0, c0) : c1 + 1]
    soft = 0.08 * max(1.0, ds / 4)
    if float(cells.max()) < plan.threshold - soft:  # glass only: no texture needed
        return out
    full = float(cells.min()) > plan.threshold + soft
    alpha = None if full else _alpha(plan, ds, x, y, w, h)
    if alpha is not None and int(alpha.max()) == 0:
        return out
    b = BLOCK // ds
    tex = out[:h, :w] if full else np.empty((h, w, 3), np.uint8)
    for by in range(y // b, (y + h - 1) // b + 1):
        for bx in range(x // b, (x + w - 1) // b + 1):
            s, t, ox, oy = plan.choice[by, bx]
            src = srcs[s][0]
            sx, sy = min(ox // ds, src.shape[1] - b), min(oy // ds, src.shape[0] - b)
            block = _block(srcs[s], int(t), sx, sy, b)
            y0, y1 = max(y, by * b), min(y + h, (by + 1) * b)
            x0, x1 = max(x, bx * b), min(x + w, (bx + 1) * b)
            tex[y0 - y : y1 - y, x0 - x : x1 - x] = block[
                y0 - by * b : y1 - by * b, x0 - bx * b : x1 - bx * b
            ]
    if alpha is not None:  # partly tissue: copy the opaque pixels, blend the soft edge
        view = out[:h, :w]
        np.copyto(view, tex, where=(alpha == 256)[..., None])
        edge = (alpha > 0) & (alpha < 256)
        a = alpha[edge][:, None]
        view[edge] = ((tex[edge] * a + _BACKGROUND.astype(np.uint16) * (256 - a)) >> 8).astype(
            np.uint8
        )
    return out


@functools.lru_cache(maxsize=4)
def _glass(tile: int) -> np.ndarray:
    """A read-only ``(tile, tile, 3)`` tile of empty glass."""
    g = np.empty((tile, tile, 3), np.uint8)
    g[:] = _BACKGROUND
    g.flags.writeable = False
    return g


def _level_sizes(width: int, height: int, factor: int) -> list[tuple[int, tuple[int, int]]]:
    """``(downsample, (w, h))`` of every level, down to below 1024 px on the long side."""
    levels = [(1, (width, height))]
    ds = 1
    while max(levels[-1][1]) >= 1024 and ds * factor <= BLOCK:
        ds *= factor
        levels.append((ds, (max(1, width // ds), max(1, height // ds))))
    return levels


def make_synthetic_slide(
    path: str | os.PathLike[str],
    *,
    width: int,
    height: int,
    mpp: float = 0.25,
    tile: int = 512,
    sources: Sequence[str | os.PathLike[str]] | None = None,
    seed: int = 0,
    quality: int = 85,
    level_factor: int = 2,
) -> Path:
    """Write a synthetic pyramidal whole-slide image.

    Parameters
    ----------
    path
        Output ``.svs`` or ``.tif`` path; written to ``<path>.tmp-<pid>`` then renamed.
    width, height
        Level-0 size in pixels (tested up to 100,000 × 100,000; memory stays bounded).
    mpp
        µm per level-0 pixel written to the metadata; sources are resampled to it.
    tile
        TIFF tile size (multiple of 16).
    sources
        Tissue images to mosaic (any file :func:`~gpfm_core.slide.open_slide` reads);
        default: the sample images in ``GPFM_DATA_DIR``.
    seed
        Random seed; the same arguments give the same file content.
    quality
        JPEG quality 1–100.
    level_factor
        2 or 4: downsample between pyramid levels (levels stop below 1024 px).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import tifffile

    out = Path(path)
    if width < 64 or height < 64:
        raise SlideError(f"slide size {width}x{height} is too small; use at least 64x64 px")
    if tile % 16 or not 16 <= tile <= 4096:
        raise SlideError(f"tile={tile} must be a multiple of 16 between 16 and 4096")
    if not (math.isfinite(mpp) and mpp > 0):
        raise SlideError(f"mpp={mpp} must be a positive number of µm per pixel, e.g. 0.25")
    if level_factor not in (2, 4):
        raise SlideError(f"level_factor={level_factor} must be 2 or 4")
    if not 1 <= quality <= 100:
        raise SlideError(f"quality={quality} must lie in 1..100")
    if out.suffix.lower() not in (".svs", ".tif", ".tiff"):
        raise SlideError(f"{out.name}: a synthetic slide must be named .svs or .tif")
    if not out.parent.is_dir():
        raise SlideError(f"folder {out.parent} does not exist; create it first")
    rng = np.random.default_rng(seed)
    need = max(width, height, 2 * BLOCK)
    base = _load_sources(list(sources) if sources else _default_sources(), mpp, need)
    plan = _make_plan(width, height, base, rng)
    levels = _level_sizes(width, height, level_factor)
    mag = round(10.0 / mpp)
    desc0 = (
        f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {mag}|MPP = {mpp:.6g}"
        f"|Generator = gpfm_core.synth seed={seed}"
    )
    log.info("writing %s: %dx%d, %d levels", out, width, height, len(levels))
    with (
        atomic_path(out) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=width * height > 2**31) as tw,
    ):
        for i, (ds, size) in enumerate(levels):
            srcs = _orient(base if ds == 1 else [_downsample(s, ds) for s in base])
            desc = desc0 if i == 0 else f"Aperio Image Library v12.0.0\r\n{size[0]}x{size[1]}"
            _write_level(
                tw,
                _tiles(plan, srcs, ds, tile, size),
                first=i == 0,
                tile=tile,
                quality=quality,
                shape=(size[1], size[0], 3),
                dtype=np.uint8,
                description=desc,
            )
    return out


def _write_level(
    tw: object, data: object, *, first: bool, tile: int, quality: int, **kw: object
) -> None:
    """One pyramid level as a JPEG-tiled RGB page (level 0 full-res, others reduced)."""
    tw.write(  # type: ignore[attr-defined]
        data,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        metadata=None,
        software=False,
        subfiletype=0 if first else 1,
        **kw,
    )


def _downsample(src: np.ndarray, ds: int) -> np.ndarray:
    from PIL import Image

    h, w = src.shape[:2]
    size = (max(BLOCK // ds, w // ds), max(BLOCK // ds, h // ds))
    return np.asarray(Image.fromarray(src).resize(size, Image.Resampling.BOX))


def _tiles(
    plan: _Plan,
    srcs: list[tuple[np.ndarray, np.ndarray]],
    ds: int,
    tile: int,
    size: tuple[int, int],
) -> Iterator[np.ndarray]:
    """Rendered tiles in row-major order; rendered on threads, at most 4 per thread ahead."""
    from concurrent.futures import Future, ThreadPoolExecutor

    workers = max(1, min(8, os.cpu_count() or 1))
    xy = ((x, y) for y in range(0, size[1], tile) for x in range(0, size[0], tile))
    pending: deque[Future[np.ndarray]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="gpfm-synth") as pool:
        try:
            for x, y in xy:
                pending.append(pool.submit(_render_tile, plan, srcs, ds, x, y, tile, size))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def write_pyramid_tiff(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    mpp: float | tuple[float, float],
    factors: Sequence[int | tuple[int, int]] = (1, 2, 4, 8),
    tile: int = 256,
    pad_to_tiles: bool = False,
    pad_value: int = 0,
    style: Literal["aperio", "generic"] = "aperio",
    level_resolution: bool = False,
    quality: int = 90,
) -> Path:
    """Write ``image`` as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide opens.

    Level ``i`` is ``image`` shrunk by ``factors[i]`` (box filter, sizes rounded down),
    optionally padded up to whole tiles, as some scanners store coarse levels. The whole
    image is held in memory: meant for small test slides (a few thousand pixels).

    Parameters
    ----------
    path
        Output ``.svs`` or ``.tif``; written atomically.
    image
        ``(H, W, 3)`` uint8 RGB level 0.
    mpp
        µm per level-0 pixel, one number or ``(x, y)`` (non-square needs ``style="generic"``).
    factors
        Downsample of each level, level 0 first (``1``); an ``(fx, fy)`` pair scales x and
        y differently (a broken pyramid).
    tile
        TIFF tile size (multiple of 16).
    pad_to_tiles
        Pad every level but level 0 with ``pad_value`` up to whole tiles.
    pad_value
        Grey value of the padding (scanners use black or white).
    style
        ``"aperio"``: an Aperio description with ``MPP`` (OpenSlide's ``aperio`` driver);
        ``"generic"``: resolution tags only (``generic-tiff``).
    level_resolution
        Give each level resolution tags scaled by its factor (with ``"generic"``, level
        0's tags are always written and copied unchanged onto the levels otherwise).
    quality
        JPEG quality 1-100.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    SlideError
        A bad argument (one line naming it).
    """
    import tifffile
    from PIL import Image

    out = Path(path)
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise SlideError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    mx, my = (float(mpp), float(mpp)) if np.isscalar(mpp) else (float(v) for v in mpp)  # type: ignore[arg-type, misc]
    if not (mx > 0 and my > 0):
        raise SlideError(f"mpp={mpp!r} must be positive")
    if style not in ("aperio", "generic"):
        raise SlideError(f"style={style!r} must be 'aperio' or 'generic'")
    if style == "aperio" and abs(mx - my) > 1e-9:
        raise SlideError("an Aperio description holds one µm/px; use style='generic'")
    if tile % 16 or tile < 16:
        raise SlideError(f"tile={tile} must be a multiple of 16")
    pairs = [(f, f) if isinstance(f, int) else (int(f[0]), int(f[1])) for f in factors]
    if not pairs or pairs[0] != (1, 1) or min(min(p) for p in pairs) < 1:
        raise SlideError(f"factors={factors!r} must start with 1 and be positive integers")
    h0, w0 = img.shape[:2]
    with atomic_path(out) as tmp, tifffile.TiffWriter(tmp) as tw:
        for i, (fx, fy) in enumerate(pairs):
            w, h = max(1, w0 // fx), max(1, h0 // fy)
            level = (
                img
                if (fx, fy) == (1, 1)
                else np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))
            )
            if pad_to_tiles and i > 0:
                padded = np.full(
                    (-(-h // tile) * tile, -(-w // tile) * tile, 3), pad_value, np.uint8
                )
                padded[:h, :w] = level
                level = padded
            kw: dict[str, object] = {}
            if style == "generic" or level_resolution:
                sx, sy = (fx, fy) if level_resolution else (1, 1)
                kw = {
                    "resolution": (1e4 / (mx * sx), 1e4 / (my * sy)),
                    "resolutionunit": "CENTIMETER",
                }
            if style == "aperio":
                head = f"Aperio Image Library v12.0.0\r\n{level.shape[1]}x{level.shape[0]}"
                kw["description"] = (
                    f"{head} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                    f"|AppMag = {round(10.0 / mx)}|MPP = {mx:.6g}"
                    if i == 0
                    else head
                )
            _write_level(tw, level, first=i == 0, tile=tile, quality=quality, **kw)
    return out
