"""The attributes of an embeddings file and the key that decides reuse."""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core import __version__

if TYPE_CHECKING:
    from gpfm_core.tiling import TileGrid
    from gpfm_core.tissue import TissueMask


def tissue_source(tissue: TissueMask | bool | None) -> str:
    """A short string identifying the tissue mask, part of the reuse key."""
    if tissue is None or tissue is True:
        return "detected"
    if tissue is False:
        return "none"
    h = hashlib.sha1(np.packbits(np.asarray(tissue.mask, dtype=bool)).tobytes())
    h.update(
        repr(
            (np.asarray(tissue.mask).shape, tuple(tissue.downsample), tuple(tissue.level0_size))
        ).encode()
    )
    return "mask:" + h.hexdigest()[:16]


def detector_params(**overrides: Any) -> dict[str, Any]:
    """The parameters :func:`~gpfm_core.tissue.detect_tissue` runs with: its defaults, overridden."""
    from gpfm_core.tissue import detect_tissue

    params = {
        name: p.default
        for name, p in inspect.signature(detect_tissue).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    params.update(overrides)
    return params


def tissue_key(tissue: TissueMask | bool | None, **detector_overrides: Any) -> dict[str, str]:
    """The tissue part of the cache key: what chose the tiles.

    Detected tissue is keyed by :data:`gpfm_core.tissue.DETECTOR_VERSION` and the detector's
    parameters (its defaults with ``detector_overrides``), so a changed detector or default
    never reuses tiles an older one chose; a given mask by its content hash; ``False`` by
    ``"none"``.

    Returns
    -------
    dict
        ``tissue_source``, ``tissue_detector``, ``tissue_params`` (JSON), all str.
    """
    from gpfm_core.tissue import DETECTOR_VERSION

    if tissue is None or tissue is True:
        params = json.dumps(detector_params(**detector_overrides), sort_keys=True, default=str)
        return {
            "tissue_source": "detected",
            "tissue_detector": DETECTOR_VERSION,
            "tissue_params": params,
        }
    if tissue is False:
        return {"tissue_source": "none", "tissue_detector": "none", "tissue_params": "{}"}
    # a given mask: its content decides, whatever made it
    return {
        "tissue_source": tissue_source(tissue),
        "tissue_detector": "mask",
        "tissue_params": "{}",
    }


def mpp_key(slide_mpp: float | tuple[float, float] | None) -> str:
    """The µm/px override as a string, part of the reuse key (``"none"`` without one)."""
    if slide_mpp is None:
        return "none"
    x, y = (slide_mpp, slide_mpp) if np.isscalar(slide_mpp) else slide_mpp  # type: ignore[misc]
    return f"{float(x):.6g},{float(y):.6g}"


def reuse_key(
    meta: Any,
    weights_hash: str,
    *,
    mpp: float | None,
    tile_px: int | None,
    overlap_px: int,
    min_tissue: float,
    tissue: TissueMask | bool | None,
    slide_mpp: float | tuple[float, float] | None,
    dtype: str,
    tissue_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings that decide whether an existing feature file is reused (its root attributes).

    ``mpp`` / ``tile_px`` None take the encoder's ``meta.tile_mpp`` / ``meta.tile_px``;
    ``tissue_options`` are :func:`~gpfm_core.tissue.detect_tissue` overrides (``exclude_ink``,
    ``modality`` ...), keyed with the detector's version and defaults. The
    embedding pipeline stores this dict in every file, and the cohort planner compares it
    (hashed) with its cohort table, so both always agree on what "the same settings" means.
    """
    return {
        "encoder": str(meta.name),
        "weights_hash": str(weights_hash),
        "requested_mpp": float(mpp if mpp is not None else meta.tile_mpp),
        "tile_px": int(tile_px if tile_px is not None else meta.tile_px),
        "overlap_px": int(overlap_px),
        "min_tissue": float(min_tissue),
        **tissue_key(tissue, **dict(tissue_options or {})),
        "slide_mpp_override": mpp_key(slide_mpp),
        "features_dtype": dtype,
    }


def magnification(mpp: float) -> int:
    """Objective magnification TRIDENT would assign to ``mpp`` µm/px (10 µm/px at 1x)."""
    return max(1, round(10.0 / mpp))


def file_attrs(
    grid: TileGrid,
    meta: Any,
    weights_hash: str,
    key: dict[str, Any],
    slide_path: Path,
    out_dir: Path,
    info: Any,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Root, ``coords`` and ``features`` attributes of the file."""
    from gpfm_core.slide._formats import slide_stem

    name = slide_stem(slide_path)
    w0, h0 = (int(v) for v in grid.level0_size)
    smx, smy = (float(v) for v in grid.slide_mpp)
    root: dict[str, Any] = dict(grid.attrs())
    root.update(
        key,
        embed_dim=int(meta.embed_dim),
        encoder_input_px=int(meta.input_px),
        encoder_meta=meta.to_json() if hasattr(meta, "to_json") else None,
        effective_mpp=float(grid.effective_mpp),
        tile_size_level0=int(grid.tile_size_level0),
        stride_level0=int(grid.stride_level0),
        read_level=int(grid.read_level),
        read_size=int(np.max(grid.read_size)),
        level0_width=w0,
        level0_height=h0,
        slide_mpp_x=smx,
        slide_mpp_y=smy,
        slide_id=str(info.slide_id),
        slide_path=str(slide_path.resolve()),
        slide_name=name,
        grid_rows=int(grid.grid_shape[0]),
        grid_cols=int(grid.grid_shape[1]),
        n_tiles=len(grid),
        gpfm_core_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    coords_attrs = trident_coords_attrs(grid, name=name, out_dir=out_dir)
    features_attrs = {"name": name, "savetodir": str(out_dir), "encoder": str(meta.name)}
    return root, coords_attrs, features_attrs


def trident_coords_attrs(grid: TileGrid, *, name: str, out_dir: Path) -> dict[str, Any]:
    """The ``coords`` attributes TRIDENT writes (``trident/IO.py`` ``coords_to_h5``), and CLAM's
    ``patch_level`` where tiles are read at a native level's size."""
    smx = float(grid.slide_mpp[0])
    attrs: dict[str, Any] = {
        "patch_size": int(grid.tile_px),
        "patch_size_level0": int(grid.tile_size_level0),
        # TRIDENT assumes square pixels; the tiles' level-0 height of a non-square pixel slide
        "patch_size_level0_y": int(grid.tile_size_level0_xy[1]),
        "level0_magnification": magnification(smx),
        "target_magnification": magnification(float(grid.effective_mpp)),
        "overlap": int(grid.overlap_px),
        "name": name,
        "savetodir": str(out_dir),
        "level0_width": int(grid.level0_size[0]),
        "level0_height": int(grid.level0_size[1]),
    }
    if int(np.max(grid.read_size)) == int(grid.tile_px):  # CLAM reads patch_size px at patch_level
        attrs["patch_level"] = int(grid.read_level)
    return attrs
