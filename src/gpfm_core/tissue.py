"""Tissue detection without model weights, and tissue masks a user can edit.

:func:`detect_tissue` reads the slide at ~``mask_mpp`` µm/px (8 by default). On brightfield
slides it white-balances against the glass, keeps coloured pixels (HSV saturation above an
Otsu threshold, or above half of it where darker than the glass), never keeps neutral
pixels (scanner fill of any grey level, black ink), and removes marker ink and
tissue-marking dye (green and blue hues) which it reports in :attr:`TissueMask.ink`. On
dark-background slides (fluorescence) tissue is what is brighter than the background.
It then closes gaps, fills small holes and removes small islands (sizes in µm, so the
result does not depend on the scanner); thin strands of stained tissue are kept.
:class:`TissueMask` carries the boolean mask, its scale, and the outline polygons in
level-0 ``(x, y)`` pixels; it is rebuilt from edited polygons or label images with
:meth:`TissueMask.from_polygons` and :meth:`TissueMask.from_array`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    from gpfm_core.slide import Slide

__all__ = ["DETECTOR_VERSION", "Polygon", "TissueMask", "detect_tissue", "mask_to_polygons"]

log = logging.getLogger(__name__)

#: Attribute set on the log record of "no tissue found" (a filter can drop it where the
#: caller reports the empty slide itself, as ``gpfm embed`` does).
NO_TISSUE_RECORD = "gpfm_no_tissue"

#: Version of :func:`detect_tissue`'s algorithm. It is part of every embedding file's cache
#: key, so a changed detector never silently reuses tiles chosen by an older one: bump it
#: whenever the masks it produces change.
DETECTOR_VERSION = "wb-hsv-otsu-ink-2"

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
        How the mask was made (method, thresholds, ``detector_version``), for provenance.
    ink : numpy.ndarray or None
        ``(H, W)`` bool, True on marker ink or tissue-marking dye that
        :func:`detect_tissue` found and left out of :attr:`mask`; None when not looked for
        (edited masks).
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    level0_size: tuple[int, int]
    _polygons: list[Polygon] | None = field(default=None, repr=False, compare=False)
    params: dict[str, Any] = field(default_factory=dict)
    ink: np.ndarray | None = field(default=None, repr=False, compare=False)

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
        return _box_fractions(self.mask, self.downsample, coords, size)

    def ink_fractions(self, coords: np.ndarray, size: float) -> np.ndarray:
        """Fraction of square level-0 boxes on marker ink or marking dye (:attr:`ink`).

        The tile table's ink flag: a tile table can keep it beside ``tissue_fraction``.
        Same arguments as :meth:`box_fractions`; all zeros when the mask has no ink layer.

        Returns
        -------
        numpy.ndarray
            ``(N,)`` float32 in [0, 1].
        """
        if self.ink is None:
            return np.zeros(len(np.asarray(coords).reshape(-1, 2)), np.float32)
        return _box_fractions(self.ink, self.downsample, coords, size)

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
    modality: Literal["auto", "brightfield", "fluorescence"] = "auto",
    exclude_ink: bool = True,
    use_darkness: bool = True,
    min_saturation: float = 0.03,
    black_value: int = 40,
    close_um: float = 16.0,
    open_um: float = 0.0,
    min_area_um2: float = 4_000.0,
    hole_area_um2: float = 5_000.0,
    ink_area_um2: float = 500.0,
) -> TissueMask:
    """Find tissue on a slide from a low-resolution read.

    Brightfield (H&E, IHC): colours are white-balanced against the glass (the brightest
    near-neutral colour population, found by Otsu), so a grey or tinted background reads
    as white. A pixel is tissue when its HSV saturation is above Otsu's threshold, or above
    half of it while darker than the glass (grey-level Otsu). Neutral pixels are never
    tissue, so scanner fill of any grey level, black ink and dust drop out. Marker ink and
    tissue-marking dye (green to blue hues, 70-250°, which H&E does not produce) are found
    by hysteresis from strongly saturated seeds and removed (:attr:`TissueMask.ink`).

    Fluorescence (a dark background with no glass, chosen automatically when most of the
    slide is dark and nothing is bright and neutral): tissue is what is brighter than the
    background (Otsu on log brightness, at least 4 noise deviations above the background
    mode).

    Then, in both: a closing joins fragments, holes smaller than ``hole_area_um2`` are
    filled and islands smaller than ``min_area_um2`` dropped (sizes in µm, so the result
    does not depend on the scanner). Thin structures are kept: no opening by default.
    Colour features are computed with scikit-image (``rgb2hsv``, ``threshold_otsu``) once
    per distinct colour (7 bits a channel) and looked up per pixel, so the cost per pixel
    is a few integer operations. The recipe follows the usual saturation/Otsu tissue
    detectors (CLAM, TRIDENT, HistoQC) with white balance, ink removal and a dark-field
    mode added.

    Parameters
    ----------
    slide
        An open :class:`~gpfm_core.slide.Slide`.
    mask_mpp
        µm/px of the mask. Without slide µm/px the mask is read at downsample
        ``clip(long side / 2048, 1, 32)`` and µm sizes assume 0.5 µm/px.
    modality
        ``"auto"`` (default) decides from the colours; ``"brightfield"`` or
        ``"fluorescence"`` force a mode.
    exclude_ink
        Remove marker ink and marking dye from the mask (default). Turn off for stains
        that colour tissue green or blue (Masson's trichrome, Alcian blue, some IHC
        counterstains), which would otherwise be taken for ink.
    use_darkness
        Also keep moderately saturated pixels darker than the glass.
    min_saturation
        Floor of the saturation threshold after white balance (glass is ~0.01): a blank
        slide stays blank.
    black_value
        Pixels whose max(R, G, B) is below this are scanner fill, never tissue.
    close_um, open_um
        Radii of the isotropic closing and opening, µm (0 skips).
    min_area_um2, hole_area_um2
        Islands smaller than ``min_area_um2`` are dropped, holes smaller than
        ``hole_area_um2`` filled (µm²).
    ink_area_um2
        Ink regions smaller than this are not ink (dense blue nuclei), µm².

    Returns
    -------
    TissueMask
        ``mask`` ``(H, W)`` bool with ``H ≈ height / downsample``; ``ink`` ``(H, W)`` bool;
        ``params`` records the mode and thresholds. Empty when there is no tissue (a
        warning names the ways out: an edited mask, or ``tissue=False``).

    Raises
    ------
    GpfmError
        ``modality`` is not one of the three names.
    """
    if modality not in ("auto", "brightfield", "fluorescence"):
        raise GpfmError(f"modality={modality!r}: use 'auto', 'brightfield' or 'fluorescence'")
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
    tissue, ink, params = _segment(
        rgb,
        um,
        modality=modality,
        exclude_ink=exclude_ink,
        use_darkness=use_darkness,
        min_saturation=min_saturation,
        black_value=black_value,
        close_um=close_um,
        open_um=open_um,
        min_area_um2=min_area_um2,
        hole_area_um2=hole_area_um2,
        ink_area_um2=ink_area_um2,
    )
    params["mask_mpp"] = um if slide_mpp is not None else None
    if params["method"] == "fluorescence":
        log.info(
            "%s: dark background without glass, so tissue is what is brighter than it "
            "(fluorescence mode); pass modality='brightfield' if this is wrong",
            slide.path.name,
        )
    if not tissue.any():
        log.warning(
            "no tissue found on %s: draw or edit the tissue mask (TissueMask.from_polygons "
            "or from_array), or pass tissue=False to use every tile",
            slide.path.name,
            extra={NO_TISSUE_RECORD: True},  # gpfm embed reports it in its own line
        )
    return TissueMask(tissue, (dx, dy), (w0, h0), None, params, ink)


def _segment(
    rgb: np.ndarray,
    um: float,
    *,
    modality: str,
    exclude_ink: bool,
    use_darkness: bool,
    min_saturation: float,
    black_value: int,
    close_um: float,
    open_um: float,
    min_area_um2: float,
    hole_area_um2: float,
    ink_area_um2: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The work of :func:`detect_tissue` on an ``(H, W, 3)`` uint8 image of ``um`` µm/px
    -> tissue ``(H, W)`` bool, ink ``(H, W)`` bool, params."""
    present, counts = _colour_counts(rgb)
    colours = _palette(present)
    if modality == "auto":
        modality = _modality(colours, counts)
    params: dict[str, Any] = {
        "method": modality,
        "detector_version": DETECTOR_VERSION,
        "exclude_ink": exclude_ink,
    }
    ink = np.zeros(rgb.shape[:2], bool)
    if modality == "fluorescence":
        tissue, fl_params = _fluorescence(rgb)
        params.update(fl_params)
    else:
        lut, bf_params = _brightfield_lut(
            colours,
            counts,
            use_darkness=use_darkness,
            min_saturation=min_saturation,
            black_value=black_value,
        )
        params.update(bf_params)
        table = np.zeros(1 << (3 * _BITS), np.uint8)
        table[present] = lut
        code = _lookup(rgb, table)
        tissue = (code & _TISSUE) > 0
        if bf_params.pop("ink_colours"):
            ink = _ink(code, ink_area_um2 / (um * um))
            if exclude_ink:
                tissue &= ~ink
    tissue = _clean(
        tissue,
        ink if exclude_ink else np.zeros_like(ink),
        r_close=close_um / um,
        r_open=open_um / um,
        hole_px=hole_area_um2 / (um * um),
        min_px=min_area_um2 / (um * um),
    )
    params["ink_fraction"] = float(ink.mean())
    return tissue, ink, params


#: Colours are quantised to this many bits a channel; features are computed once per
#: distinct colour (at most 2**21) and looked up per pixel.
_BITS = 7
_TISSUE, _INK_WEAK, _INK_STRONG = 1, 2, 4
#: Hues (degrees) of marker inks and marking dyes that H&E never produces: green to blue.
_INK_HUES = (70.0, 250.0)
#: Saturation (after white balance) from which an ink-hued colour seeds an ink region;
#: strokes are 0.5-0.8, hematoxylin-blue tissue rarely above 0.3 at 8 µm/px.
_INK_SEED_SATURATION = 0.3
_STRIP_PX = 1 << 22  # pixels per strip when indexing colours (bounds temporary memory)


def _colour_index(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(H, W)`` uint32 index of the quantised colour."""
    q = 8 - _BITS
    idx = (rgb[..., 0] >> q).astype(np.uint32) << (2 * _BITS)
    idx |= (rgb[..., 1] >> q).astype(np.uint32) << _BITS
    idx |= rgb[..., 2] >> q
    return idx


def _strips(rgb: np.ndarray) -> Iterator[slice]:
    rows = max(1, _STRIP_PX // max(1, rgb.shape[1]))
    for r0 in range(0, rgb.shape[0], rows):
        yield slice(r0, r0 + rows)


def _colour_counts(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quantised colours present ``(K,)`` and their pixel counts ``(K,)``."""
    counts = np.zeros(1 << (3 * _BITS), np.int64)
    for sl in _strips(rgb):
        counts += np.bincount(_colour_index(rgb[sl]).ravel(), minlength=counts.size)
    present = np.flatnonzero(counts)
    return present, counts[present]


def _lookup(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[colour index]`` for every pixel -> ``(H, W)`` of ``table.dtype``."""
    out = np.empty(rgb.shape[:2], table.dtype)
    for sl in _strips(rgb):
        out[sl] = table[_colour_index(rgb[sl])]
    return out


def _palette(index: np.ndarray) -> np.ndarray:
    """Centres of quantised colours -> ``(K, 3)`` float64 RGB in [0, 1]."""
    q = 8 - _BITS
    m = (1 << _BITS) - 1
    chans = [(index >> (2 * _BITS)) & m, (index >> _BITS) & m, index & m]
    return (np.stack(chans, axis=1) * (1 << q) + ((1 << q) - 1) / 2) / 255.0


def _weighted_otsu(values: np.ndarray, weights: np.ndarray, *, bins: int = 256) -> float | None:
    """Otsu's threshold of ``values`` in [0, 1] counted ``weights`` times (None if flat)."""
    from skimage.filters import threshold_otsu

    if values.size == 0:
        return None
    hist = np.bincount(
        np.clip((values * (bins - 1)).round().astype(np.int64), 0, bins - 1),
        weights=weights,
        minlength=bins,
    )
    if (hist > 0).sum() < 2:
        return None
    return float(threshold_otsu(hist=(hist, np.arange(bins) / (bins - 1))))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def _modality(colours: np.ndarray, counts: np.ndarray) -> str:
    """ "fluorescence" when most of the slide is dark and nothing is bright and neutral."""
    v = colours.max(axis=1)
    chroma = v - colours.min(axis=1)
    w = counts / counts.sum()
    dark = w[v < 0.3].sum()
    glass = w[(v >= 0.6) & (chroma < 0.15 * v)].sum()
    return "fluorescence" if dark >= 0.5 and glass < 0.02 else "brightfield"


def _glass_colour(colours: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The glass: the brighter Otsu class of near-neutral colours, its median ``(3,)``."""
    v = colours.max(axis=1)
    neutral = (v - colours.min(axis=1) < 0.12 * v) & (v >= 0.35)
    if counts[neutral].sum() == 0:
        return np.ones(3)
    cv, cw, cc = v[neutral], counts[neutral], colours[neutral]
    t = _weighted_otsu(cv, cw)
    upper = cv >= t if t is not None else np.ones(cv.shape, bool)
    return np.array([_weighted_median(cc[upper, i], cw[upper]) for i in range(3)])


def _brightfield_lut(
    colours: np.ndarray,
    counts: np.ndarray,
    *,
    use_darkness: bool,
    min_saturation: float,
    black_value: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-colour codes (tissue / weak ink / strong ink bits) ``(K,)`` uint8 and thresholds."""
    from skimage.color import rgb2hsv

    glass = _glass_colour(colours, counts)
    wb = np.clip(colours / glass, 0.0, 1.0)
    hsv = rgb2hsv(wb[None])[0]
    hue, sat, val = hsv[:, 0] * 360.0, hsv[:, 1], hsv[:, 2]
    grey = wb.mean(axis=1)
    # black: scanner fill, black ink, and any dark colour without a hue
    dark = (colours.max(axis=1) * 255 < black_value) | ((val < 0.5) & (sat < 0.25))
    lit = ~dark
    ink_hue = lit & (hue >= _INK_HUES[0]) & (hue <= _INK_HUES[1])
    # thresholds from glass and stain only: ink strokes must not pull them
    stats = lit & ~(ink_hue & (sat > min_saturation))
    t_sat = _weighted_otsu(sat[stats], counts[stats])
    t_sat = max(min_saturation, t_sat if t_sat is not None else 1.0)
    low_sat = max(min_saturation, t_sat / 2)
    tissue = lit & (sat > t_sat)
    t_grey = None
    if use_darkness:
        # glass and coloured pixels only: neutral fill must not pull the threshold
        pop = stats & ((sat > low_sat) | (grey >= 0.9))
        t_grey = _weighted_otsu(grey[pop], counts[pop])
        if t_grey is not None:
            t_grey = min(0.9, t_grey)
            tissue |= lit & (sat > low_sat) & (grey < t_grey)
    code = (
        tissue * _TISSUE
        + (ink_hue & (sat > low_sat)) * _INK_WEAK
        + (ink_hue & (sat > _INK_SEED_SATURATION)) * _INK_STRONG
    ).astype(np.uint8)
    params = {
        "glass_rgb": [round(float(c) * 255, 1) for c in glass],
        "ink_colours": bool((code & _INK_STRONG).any()),
        "saturation_threshold": t_sat,
        "low_saturation_threshold": low_sat,
        "grey_threshold": t_grey,
    }
    return code, params


def _ink(code: np.ndarray, min_px: float) -> np.ndarray:
    """Ink: weak ink pixels connected to strong ones (hysteresis), in regions of at least
    ``min_px`` pixels -> ``(H, W)`` bool."""
    from skimage.filters import apply_hysteresis_threshold

    ink = np.zeros(code.shape, bool)
    # small regions first: it leaves few for the hysteresis, and its result is the same
    weak = _remove_small_objects((code & (_INK_WEAK | _INK_STRONG)) > 0, min_px)
    r = np.flatnonzero(weak.any(axis=1))
    if r.size == 0:
        return ink
    c = np.flatnonzero(weak.any(axis=0))
    box = (slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))  # only ink's bounding box
    seeds = weak[box].astype(np.uint8) + (weak[box] & ((code[box] & _INK_STRONG) > 0))
    ink[box] = apply_hysteresis_threshold(seeds, 0.5, 1.5)
    return ink


def _fluorescence(rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Tissue brighter than a dark background -> ``(H, W)`` bool and thresholds."""
    from skimage.filters import threshold_otsu

    lum = np.empty(rgb.shape[:2], np.uint16)
    for sl in _strips(rgb):
        lum[sl] = rgb[sl].sum(axis=2, dtype=np.uint16)
    hist = np.bincount(lum.ravel(), minlength=766)
    levels = np.log1p(np.arange(766.0))  # Otsu on log brightness: the signal is skewed
    t = float(np.expm1(threshold_otsu(hist=(hist, levels)))) if (hist > 0).sum() > 1 else 765.0
    # the background: the mode below Otsu's threshold (tissue may cover most of the slide),
    # and its noise from the darker side of that mode
    mode = int(np.argmax(hist[: math.floor(t) + 1]))
    low = hist[: mode + 1]
    spread = math.sqrt(float((low * (np.arange(mode + 1) - mode) ** 2).sum() / low.sum()))
    thr = max(t, mode + max(4.0, 4 * spread))  # a blank slide stays blank
    return lum > thr, {"background_level": mode, "brightness_threshold": thr}


def _clean(
    tissue: np.ndarray,
    ink: np.ndarray,
    *,
    r_close: float,
    r_open: float,
    hole_px: float,
    min_px: float,
) -> np.ndarray:
    """Close gaps, open specks, fill small holes, drop small islands; never ink."""
    # whole-pixel radii: a disc of radius 2 px holds its four axis neighbours at 2, one of
    # 1.99 px does not, and sizes in µm rarely land on whole pixels
    rc, ro = round(r_close), round(r_open)
    if rc > 0:
        tissue = _morph(tissue, rc, "closing") & ~ink
    if ro > 0:
        tissue = _morph(tissue, ro, "opening")
    # pad with background so that glass along the border is one component, never a hole
    padded = _remove_small_holes(np.pad(tissue, 1), hole_px)
    return _remove_small_objects(padded[1:-1, 1:-1], min_px)


def _morph(mask: np.ndarray, radius: int, op: str) -> np.ndarray:
    """Binary ``"closing"`` or ``"opening"`` by a disc of ``radius`` px; outside the image
    counts as background for dilation and as foreground for erosion (scikit-image's
    convention).

    Small discs use SciPy's binary morphology with scikit-image's ``disk`` footprint (~2x
    faster than grey-level ``skimage.morphology.closing``); large ones scikit-image's
    distance-transform ``isotropic_*`` functions, whose cost does not grow with the radius.
    Both give the same result."""
    from scipy import ndimage
    from skimage import morphology

    if radius > 6:
        fn = morphology.isotropic_closing if op == "closing" else morphology.isotropic_opening
        return fn(mask, radius)
    fp = morphology.disk(radius)
    if op == "closing":
        return ndimage.binary_erosion(ndimage.binary_dilation(mask, fp), fp, border_value=1)
    return ndimage.binary_dilation(ndimage.binary_erosion(mask, fp, border_value=1), fp)


@functools.cache
def _has_max_size(fn: Any) -> bool:
    """scikit-image >= 0.26 names the size limit ``max_size`` (inclusive); older versions
    ``min_size`` / ``area_threshold`` (exclusive)."""
    return "max_size" in inspect.signature(fn).parameters


def _remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop components of fewer than ``min_px`` pixels (scikit-image, any version)."""
    from skimage.morphology import remove_small_objects

    n = math.ceil(min_px)
    if n <= 1 or not mask.any():
        return mask
    if _has_max_size(remove_small_objects):
        return remove_small_objects(mask, max_size=n - 1)
    return remove_small_objects(mask, min_size=n)


def _remove_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill holes of fewer than ``max_px`` pixels (scikit-image, any version)."""
    from skimage.morphology import remove_small_holes

    n = math.ceil(max_px)
    if n <= 1:
        return mask
    if _has_max_size(remove_small_holes):
        return remove_small_holes(mask, max_size=n - 1)
    return remove_small_holes(mask, area_threshold=n)


def _box_fractions(
    mask: np.ndarray, downsample: tuple[float, float], coords: np.ndarray, size: float
) -> np.ndarray:
    """Covered fraction of ``size``-px level-0 boxes at ``coords`` ``(N, 2)`` -> ``(N,)``."""
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1, out=integral[1:, 1:])
    dx, dy = downsample
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


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _as_xy(a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a, np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 3:
        raise GpfmError(f"a polygon must be a (K>=3, 2) array of (x, y), got shape {arr.shape}")
    return arr
