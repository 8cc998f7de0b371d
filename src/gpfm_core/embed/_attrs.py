"""The attributes of an embeddings file and the key that decides reuse."""

from __future__ import annotations

import hashlib
import time
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


def mpp_key(slide_mpp: float | tuple[float, float] | None) -> str:
    """The µm/px override as a string, part of the reuse key (``"none"`` without one)."""
    if slide_mpp is None:
        return "none"
    x, y = (slide_mpp, slide_mpp) if np.isscalar(slide_mpp) else slide_mpp  # type: ignore[misc]
    return f"{float(x):.6g},{float(y):.6g}"


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
    name = slide_path.stem
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
    coords_attrs: dict[str, Any] = {  # TRIDENT's names (trident/IO.py coords_to_h5)
        "patch_size": int(grid.tile_px),
        "patch_size_level0": int(grid.tile_size_level0),
        "level0_magnification": magnification(smx),
        "target_magnification": magnification(float(grid.effective_mpp)),
        "overlap": int(grid.overlap_px),
        "name": name,
        "savetodir": str(out_dir),
        "level0_width": w0,
        "level0_height": h0,
    }
    if int(np.max(grid.read_size)) == int(grid.tile_px):  # CLAM reads patch_size px at patch_level
        coords_attrs["patch_level"] = int(grid.read_level)
    features_attrs = {"name": name, "savetodir": str(out_dir), "encoder": str(meta.name)}
    return root, coords_attrs, features_attrs
