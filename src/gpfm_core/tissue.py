"""Tissue detection without model weights, and tissue masks a user can edit.

:func:`detect_tissue` reads the slide at ~``mask_mpp`` µm/px (8 by default), keeps pixels
that are coloured (HSV saturation above an Otsu threshold) or, optionally, darker than
the glass, drops black scanner fill, then closes gaps, opens specks, fills small holes
and removes small islands (sizes in µm, so the result does not depend on the scanner).
:class:`TissueMask` carries the boolean mask, its scale, and the outline polygons in
level-0 ``(x, y)`` pixels; it is rebuilt from edited polygons or label images with
:meth:`TissueMask.from_polygons` and :meth:`TissueMask.from_array`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    from gpfm_core.slide import Slide

__all__ = ["DETECTOR_VERSION", "Polygon", "TissueMask", "detect_tissue", "mask_to_polygons"]

log = logging.getLogger(__name__)

#: Version of :func:`detect_tissue`'s algorithm. It is part of every embedding file's cache
#: key, so a changed detector never silently reuses tiles chosen by an older one: bump it
#: whenever the masks it produces change.
DETECTOR_VERSION = "saturation-otsu-1"

#: µm/px assumed for area thresholds when the slide has no µm/px (a 20x scan).
ASSUMED_MPP = 0.5
_MAX_MASK_SIDE = 8192


@dataclass(frozen=True)
class Polygon:
    """A tissue outline in level-0 pixels.

    Attributes
    ----------
    exterior : numpy.ndarray
        ``(K, 2)`` float64 ``(x, y)`` vertices, closed implicitly.
    holes : list of numpy.ndarray
        ``(K_i, 2)`` float64 ``(x, y)`` vertices of each hole.
    """

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    @property
    def area(self) -> float:
        """Area in level-0 px² (exterior minus holes)."""
        return _shoelace(self.exterior) - sum(_shoelace(h) for h in self.holes)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in level-0 px."""
        lo, hi = self.exterior.min(axis=0), self.exterior.max(axis=0)
        return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over a whole slide.

    Attributes
    ----------
    mask : numpy.ndarray
        ``(H, W)`` bool, True on tissue.
    downsample : (float, float)
        Level-0 pixels per mask pixel ``(dx, dy)``.
    level0_size : (int, int)
        Level-0 ``(width, height)`` of the slide.
    polygons : list of Polygon
        Outlines (exteriors and holes) in level-0 ``(x, y)``, traced lazily.
    params : dict
        How the mask was made (method, thresholds), for provenance.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    level0_size: tuple[int, int]
    _polygons: list[Polygon] | None = field(default=None, repr=False, compare=False)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def polygons(self) -> list[Polygon]:
        """Outlines in level-0 ``(x, y)``; traced from :attr:`mask` on first access."""
        if self._polygons is None:
            object.__setattr__(self, "_polygons", mask_to_polygons(self.mask, self.downsample))
        return self._polygons  # type: ignore[return-value]

    @property
    def n_regions(self) -> int:
        """Number of connected tissue regions (cheap; no outline tracing)."""
        from scipy import ndimage

        return int(ndimage.label(self.mask)[1]) if self.mask.any() else 0

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide covered by tissue, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def is_empty(self) -> bool:
        """True when no pixel is tissue."""
        return not bool(self.mask.any())

    def box_fractions(self, coords: np.ndarray, size: float) -> np.ndarray:
        """Exact tissue fraction of square level-0 boxes, vectorised.

        Uses the integral image, bilinearly interpolated, so boxes that cut mask pixels
        count the covered part of each pixel.

        Parameters
        ----------
        coords
            ``(N, 2)`` level-0 ``(x, y)`` top-left corners.
        size
            Box side in level-0 px.

        Returns
        -------
        numpy.ndarray
            ``(N,)`` float32 in [0, 1].
        """
        coords = np.asarray(coords, np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        integral = np.zeros((h + 1, w + 1), np.float64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=integral[1:, 1:])
        dx, dy = self.downsample
        c0 = np.clip(coords[:, 0] / dx, 0, w)
        c1 = np.clip((coords[:, 0] + size) / dx, 0, w)
        r0 = np.clip(coords[:, 1] / dy, 0, h)
        r1 = np.clip((coords[:, 1] + size) / dy, 0, h)

        def f(r: np.ndarray, c: np.ndarray) -> np.ndarray:
            i = np.minimum(np.floor(r).astype(np.int64), h - 1)
            j = np.minimum(np.floor(c).astype(np.int64), w - 1)
            fr, fc = r - i, c - j
            return (
                integral[i, j] * (1 - fr) * (1 - fc)
                + integral[i + 1, j] * fr * (1 - fc)
                + integral[i, j + 1] * (1 - fr) * fc
                + integral[i + 1, j + 1] * fr * fc
            )

        covered = f(r1, c1) - f(r0, c1) - f(r1, c0) + f(r0, c0)
        area = (size / dx) * (size / dy)
        return np.clip(covered / area, 0.0, 1.0).astype(np.float32)

    @classmethod
    def from_polygons(
        cls,
        polygons: Sequence[Polygon | np.ndarray],
        *,
        level0_size: tuple[int, int],
        downsample: float | tuple[float, float],
    ) -> TissueMask:
        """Rasterise level-0 ``(x, y)`` polygons (e.g. an edited Shapes layer).

        Parameters
        ----------
        polygons
            :class:`Polygon` objects or ``(K, 2)`` ``(x, y)`` arrays (exteriors only).
        level0_size
            Level-0 ``(width, height)``.
        downsample
            Level-0 px per mask px; one number or ``(dx, dy)``.
        """
        from skimage.draw import polygon as fill

        dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample  # type: ignore[misc]
        dx, dy = float(dx), float(dy)
        if not (dx > 0 and dy > 0):
            raise GpfmError(f"downsample={downsample!r} must be positive, e.g. 16")
        shape = (max(1, math.ceil(level0_size[1] / dy)), max(1, math.ceil(level0_size[0] / dx)))
        polys = [p if isinstance(p, Polygon) else Polygon(_as_xy(p)) for p in polygons]
        mask = np.zeros(shape, bool)
        for p in polys:
            for ring, value in [(p.exterior, True)] + [(h, False) for h in p.holes]:
                rr, cc = fill(ring[:, 1] / dy - 0.5, ring[:, 0] / dx - 0.5, shape)
                mask[rr, cc] = value
        return cls(mask, (dx, dy), tuple(level0_size), polys, {"method": "polygons"})  # type: ignore[arg-type]

    @classmethod
    def from_array(cls, mask: np.ndarray, *, level0_size: tuple[int, int]) -> TissueMask:
        """Wrap a user-edited ``(H, W)`` array (non-zero = tissue) covering the slide."""
        m = np.asarray(mask)
        if m.ndim != 2 or 0 in m.shape:
            raise GpfmError(f"a tissue mask must be a non-empty 2-D array, got shape {m.shape}")
        m = m != 0
        ds = (level0_size[0] / m.shape[1], level0_size[1] / m.shape[0])
        return cls(m, ds, tuple(level0_size), None, {"method": "array"})  # type: ignore[arg-type]


def detect_tissue(
    slide: Slide,
    *,
    mask_mpp: float = 8.0,
    use_darkness: bool = True,
    min_saturation: float = 0.07,
    black_value: int = 40,
    close_um: float = 16.0,
    open_um: float = 8.0,
    min_area_um2: float = 10_000.0,
    hole_area_um2: float = 5_000.0,
) -> TissueMask:
    """Find tissue on a slide from a low-resolution read.

    Parameters
    ----------
    slide
        An open :class:`~gpfm_core.slide.Slide`.
    mask_mpp
        µm/px of the mask. Without slide µm/px the mask is read at downsample
        ``clip(long side / 2048, 1, 32)`` and µm sizes assume 0.5 µm/px.
    use_darkness
        Also keep unsaturated pixels darker than the glass (grey-level Otsu, < 220).
    min_saturation
        Floor of the saturation threshold (white glass is ~0.02): a blank slide stays blank.
    black_value
        Pixels whose max(R, G, B) is below this are scanner fill, never tissue.
    close_um, open_um
        Radii of the morphological closing and opening, µm.
    min_area_um2, hole_area_um2
        Islands smaller than ``min_area_um2`` are dropped, holes smaller than
        ``hole_area_um2`` filled (µm²).

    Returns
    -------
    TissueMask
        ``mask`` ``(H, W)`` bool with ``H ≈ height / downsample``; empty when there is no
        tissue (a warning is logged).
    """
    w0, h0 = slide.dimensions
    slide_mpp = slide.info.mpp
    if slide_mpp is not None:
        ds = max(1.0, mask_mpp / slide_mpp[0], max(w0, h0) / _MAX_MASK_SIDE)
        px_um = slide_mpp[0]
    else:
        ds = float(np.clip(max(w0, h0) / 2048, 1.0, 32.0))
        px_um = ASSUMED_MPP
    size = (max(1, round(w0 / ds)), max(1, round(h0 / ds)))
    rgb = slide.read_scaled(size)
    dx, dy = w0 / size[0], h0 / size[1]
    um = px_um * dx  # µm per mask pixel
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    # HSV saturation (max - min) / max, quantised to 0..255
    sat = ((vmax - vmin).astype(np.uint16) * 255 // np.maximum(vmax, 1)).astype(np.uint8)
    not_black = vmax >= black_value
    sat_thr = _otsu_u8(sat[not_black], floor=round(min_saturation * 255))
    tissue = (sat > sat_thr) & not_black
    grey_thr = None
    if use_darkness and not_black.any():
        grey = ((r.astype(np.uint16) + g + b) // 3).astype(np.uint8)
        grey_thr = min(220, _otsu_u8(grey[not_black], floor=0))
        tissue |= (grey < grey_thr) & not_black
    sat_thr /= 255.0
    tissue = _close_open(tissue, close_um / um, open_um / um)
    hole_px = hole_area_um2 / (um * um)
    holes = _small_components(~tissue, hole_px, skip_border=True)
    tissue |= holes
    tissue &= ~_small_components(tissue, min_area_um2 / (um * um))
    params = {
        "method": "saturation-otsu" + ("+darkness" if use_darkness else ""),
        "detector_version": DETECTOR_VERSION,
        "mask_mpp": um if slide_mpp is not None else None,
        "saturation_threshold": sat_thr,
        "grey_threshold": grey_thr,
    }
    if not tissue.any():
        log.warning("no tissue found on %s", slide.path.name)
    return TissueMask(tissue, (dx, dy), (w0, h0), None, params)


def mask_to_polygons(
    mask: np.ndarray, downsample: tuple[float, float], *, tolerance: float = 0.5
) -> list[Polygon]:
    """Outline every connected component of ``mask`` -> level-0 :class:`Polygon` list.

    Parameters
    ----------
    mask
        ``(H, W)`` bool.
    downsample
        Level-0 px per mask px ``(dx, dy)``.
    tolerance
        Douglas–Peucker simplification in mask px.
    """
    from scipy import ndimage
    from skimage.measure import find_contours

    labels, _ = ndimage.label(mask)
    dx, dy = downsample
    out: list[Polygon] = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = np.pad(labels[sl] == i, 1)
        rings = []
        for c in find_contours(comp.astype(np.float32), 0.5):
            c = _drop_collinear(c)
            c = _simplify(c, tolerance) if tolerance > 0 and len(c) > 4 else c
            if len(c) < 4:
                continue
            xy = np.column_stack(
                [(c[:, 1] - 1 + sl[1].start + 0.5) * dx, (c[:, 0] - 1 + sl[0].start + 0.5) * dy]
            )
            rings.append(xy)
        if not rings:
            continue
        k = int(np.argmax([_shoelace(r) for r in rings]))
        out.append(Polygon(rings[k], [r for j, r in enumerate(rings) if j != k]))
    return out


def _otsu_u8(values: np.ndarray, *, floor: int) -> int:
    """Otsu threshold of uint8 values from a 256-bin histogram, never below ``floor``."""
    from skimage.filters import threshold_otsu

    counts = np.bincount(values.ravel(), minlength=256)
    if (counts > 0).sum() < 2:
        return max(floor, int(values.max()) if values.size else floor)
    return max(floor, int(threshold_otsu(hist=(counts, np.arange(256)))))


def _small_components(mask: np.ndarray, max_px: float, *, skip_border: bool = False) -> np.ndarray:
    """Pixels of connected components of ``mask`` with fewer than ``max_px`` pixels."""
    from scipy import ndimage

    if max_px <= 0 or not mask.any():
        return np.zeros_like(mask)
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < max_px
    small[0] = False
    if skip_border:  # background touching the border is glass, not a hole
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        small[np.unique(edge)] = False
    return small[labels]


def _drop_collinear(c: np.ndarray) -> np.ndarray:
    """Drop vertices where a closed ``(K, 2)`` contour goes straight on (vectorised).

    Contours of a pixel mask are long runs of unit steps; this shrinks them ~5-20x
    before the (slow, pure Python) Douglas–Peucker step without changing the shape.
    """
    if len(c) < 4:
        return c
    ring = c[:-1] if np.array_equal(c[0], c[-1]) else c
    prev = ring - np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0) - ring
    cross = prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]
    keep = np.abs(cross) > 1e-9
    if keep.sum() < 3:
        return c
    kept = ring[keep]
    return np.vstack([kept, kept[:1]])


def _simplify(c: np.ndarray, tol: float) -> np.ndarray:
    """Douglas–Peucker simplification of a ``(K, 2)`` polyline (closed if first == last)."""
    n = len(c)
    keep = np.zeros(n, bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        a, d = c[i], c[j] - c[i]
        seg = c[i + 1 : j] - a
        length = math.hypot(d[0], d[1])
        if length == 0:
            dist = np.hypot(seg[:, 0], seg[:, 1])
        else:
            dist = np.abs(seg[:, 0] * d[1] - seg[:, 1] * d[0]) / length
        k = int(np.argmax(dist))
        if dist[k] > tol:
            m = i + 1 + k
            keep[m] = True
            stack.extend(((i, m), (m, j)))
    return c[keep]


def _close_open(mask: np.ndarray, r_close: float, r_open: float) -> np.ndarray:
    """Morphological closing then opening with discs of radius ``r`` px, via the
    Euclidean distance transform (cost independent of the radius)."""
    from scipy import ndimage
    from scipy.ndimage import distance_transform_edt as edt

    if max(r_close, r_open) <= 6:  # small discs: plain binary morphology is cheaper
        rc, ro = round(r_close), round(r_open)
        if rc > 0:
            pad = rc + 1
            grown = ndimage.binary_dilation(np.pad(mask, pad), _disk(rc))
            mask = ndimage.binary_erosion(grown, _disk(rc), border_value=1)[pad:-pad, pad:-pad]
        if ro > 0:
            mask = ndimage.binary_opening(mask, _disk(ro))
        return mask
    if r_close >= 0.5:
        pad = math.ceil(r_close) + 1
        grown = edt(~np.pad(mask, pad)) <= r_close  # dilate (outside counts as background)
        mask = (edt(grown) > r_close)[pad:-pad, pad:-pad]  # erode
    if r_open >= 0.5:
        shrunk = edt(np.pad(mask, 1)) > r_open
        mask = (edt(~shrunk) <= r_open)[1:-1, 1:-1]
    return mask


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _as_xy(a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a, np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 3:
        raise GpfmError(f"a polygon must be a (K>=3, 2) array of (x, y), got shape {arr.shape}")
    return arr
