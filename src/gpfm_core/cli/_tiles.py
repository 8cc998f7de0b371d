"""``gpfm tiles``: tissue detection and the tile grid of a slide, optionally saved to HDF5.

``--out DIR`` writes ``DIR/<mpp>mpp_<tile_px>px_<overlap>px_overlap/patches/<slide>_patches.h5``
(TRIDENT's coordinates layout, :mod:`gpfm_core.embed.layout`); ``--out FILE.h5`` writes that
file. Either way under the file's lock, and a file holding another slide, or this slide
made with other settings, is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from gpfm_core._atomic import atomic_path
from gpfm_core.embed._errors import EmbeddingsClashError
from gpfm_core.errors import GpfmError

HELP = "detect tissue and lay a tile grid at a physical resolution; save coords to HDF5"
#: A tile with more than this fraction of marker ink counts as inked in the summary.
INKED = 0.05


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm tiles SLIDE --mpp --tile-px [--overlap] [--min-tissue] [--out]``."""
    p = subparsers.add_parser("tiles", help=HELP, description=HELP)
    p.add_argument("slide", help="slide file")
    p.add_argument("--mpp", type=float, default=0.5, help="tile resolution, µm/px (0.5)")
    p.add_argument("--tile-px", type=int, default=224, help="tile side in pixels (224)")
    p.add_argument("--overlap", type=int, default=0, help="overlap between tiles, px (0)")
    p.add_argument(
        "--min-tissue", type=float, default=0.25, help="keep tiles with this tissue fraction (0.25)"
    )
    p.add_argument("--no-tissue", action="store_true", help="keep every tile, skip detection")
    p.add_argument("--mask-mpp", type=float, default=8.0, help="tissue-mask µm/px (8)")
    add_tissue_arguments(p)
    p.add_argument("--slide-mpp", type=float, default=None, metavar="X", help="µm/px override")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write coords + attributes: a folder (<out>/<tiling>/patches/<slide>_patches.h5, "
        "TRIDENT's layout) or a .h5 file",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a --out file that holds another slide or other settings",
    )
    return p


def add_tissue_arguments(p: argparse.ArgumentParser) -> None:
    """``--keep-ink`` and ``--modality``: the tissue detector's options (``gpfm tiles``/``embed``)."""
    p.add_argument(
        "--keep-ink",
        action="store_true",
        help="keep blue/green marker ink and marking dye as tissue (stains that colour "
        "tissue blue or green: trichrome, Alcian blue); ink stays flagged per tile",
    )
    p.add_argument(
        "--modality",
        choices=["auto", "brightfield", "fluorescence"],
        default="auto",
        help="tissue detection mode (default: auto, from the slide's colours)",
    )


def tissue_options(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The detector's keyword arguments from ``--keep-ink`` / ``--modality`` (defaults left out,
    so a default run keys its files as before)."""
    opts: dict[str, Any] = dict(extra)
    if args.keep_ink:
        opts["exclude_ink"] = False
    if args.modality != "auto":
        opts["modality"] = args.modality
    return opts


def write_coords_h5(
    path: Path,
    grid: Any,
    *,
    extra: dict[str, Any] | None = None,
    coords_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write ``coords`` (N, 2) int64, ``grid_rc``, ``tissue_fraction``, ``ink_fraction`` and
    attributes atomically."""
    import h5py

    path = Path(path)
    if not path.parent.is_dir():
        raise GpfmError(f"folder {path.parent} does not exist; create it or choose another --out")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=grid.coords)
        ds.attrs.update(grid.attrs())
        ds.attrs.update(coords_attrs or {})
        f.create_dataset("grid_rc", data=grid.grid_rc)
        f.create_dataset("tissue_fraction", data=grid.tissue_fraction)
        f.create_dataset("ink_fraction", data=grid.ink_fraction)
        f.attrs.update(grid.attrs())
        f.attrs.update(extra or {})
    return path


def save_tiles(
    out: Path,
    grid: Any,
    *,
    slide_path: Path,
    key: dict[str, Any],
    extra: dict[str, Any],
    force: bool = False,
) -> Path:
    """Write the tile list of one slide to ``out`` (folder or ``.h5``) under its lock.

    Raises
    ------
    EmbeddingsClashError
        The file holds another slide, or this slide made with other settings, and not ``force``.
    """
    import contextlib

    from gpfm_core.embed._attrs import trident_coords_attrs
    from gpfm_core.embed.layout import (
        PATCHES_SUFFIX,
        claim_slide_file,
        coords_dir,
        file_slide_id,
        remove_stale_temps,
        settings_diff,
        slide_lock,
    )
    from gpfm_core.embed.loading import read_attrs
    from gpfm_core.slide import slide_stem

    slide_id = str(key["slide_id"])
    with contextlib.ExitStack() as stack:
        if out.suffix.lower() in (".h5", ".hdf5"):
            if not out.parent.is_dir():
                raise GpfmError(
                    f"folder {out.parent} does not exist; create it or choose another --out"
                )
            target = stack.enter_context(slide_lock(out))
            remove_stale_temps(target)
        else:
            folder = coords_dir(
                out, mpp=grid.requested_mpp, tile_px=grid.tile_px, overlap_px=grid.overlap_px
            )
            target = stack.enter_context(
                claim_slide_file(folder, slide_path, slide_id, suffix=PATCHES_SUFFIX)
            )
        if target.exists() and not force:
            owner = file_slide_id(target)
            if owner != slide_id:
                held = read_attrs(target).get("slide_path") if owner else None
                raise EmbeddingsClashError(
                    f"cannot write the tiles of {slide_path} to {target}: it holds "
                    f"{held or 'another slide'}; pass --force to replace it, or choose another "
                    "--out"
                )
            diff = settings_diff(read_attrs(target), key)
            if diff:
                raise EmbeddingsClashError(
                    f"cannot write the tiles of {slide_path} to {target}: it holds this slide "
                    f"made with other settings ({'; '.join(diff)}); pass --force to replace it, "
                    "or choose another --out"
                )
        return write_coords_h5(
            target,
            grid,
            extra={**key, **extra},
            coords_attrs=trident_coords_attrs(
                grid, name=slide_stem(slide_path), out_dir=target.parent
            ),
        )


def run(args: argparse.Namespace) -> int:
    """Detect tissue, build the grid, print a summary, optionally save; returns 0."""
    from gpfm_core.slide import open_slide
    from gpfm_core.tiling import check_grid_args, make_tile_grid
    from gpfm_core.tissue import detect_tissue

    if not args.mask_mpp > 0:
        raise GpfmError(f"--mask-mpp {args.mask_mpp} must be positive, e.g. 8")
    check_grid_args(
        mpp=args.mpp, tile_px=args.tile_px, overlap_px=args.overlap, min_tissue=args.min_tissue
    )
    detector = tissue_options(args, mask_mpp=args.mask_mpp)
    with open_slide(args.slide, mpp=args.slide_mpp) as slide:
        _ = slide.mpp  # fail early, before tissue detection, when µm/px is unknown
        mask = None if args.no_tissue else detect_tissue(slide, **detector)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grid = make_tile_grid(
                slide,
                mpp=args.mpp,
                tile_px=args.tile_px,
                overlap_px=args.overlap,
                min_tissue=args.min_tissue,
                tissue=False if mask is None else mask,
            )
        name = slide.path.name
        slide_id = slide.info.slide_id
    for w in caught:
        print(f"gpfm tiles: warning: {w.message}", file=sys.stderr)
    summary: dict[str, Any] = {
        "slide": str(args.slide),
        "tissue_fraction": None if mask is None else round(mask.tissue_fraction, 4),
        "n_tissue_regions": None if mask is None else mask.n_regions,
        "n_inked_tiles": int((grid.ink_fraction > INKED).sum()),
        **grid.attrs(),
    }
    if args.out is not None:
        from gpfm_core.embed._attrs import mpp_key, tissue_key

        key = {
            "slide_id": slide_id,
            "requested_mpp": float(grid.requested_mpp),
            "tile_px": int(grid.tile_px),
            "overlap_px": int(grid.overlap_px),
            "min_tissue": float(grid.min_tissue),
            **(tissue_key(False) if mask is None else tissue_key(None, **detector)),
            "slide_mpp_override": mpp_key(args.slide_mpp),
        }
        extra: dict[str, Any] = {"slide_path": str(Path(args.slide).resolve())}
        if mask is not None:
            extra["slide_tissue_fraction"] = mask.tissue_fraction
        path = save_tiles(
            args.out, grid, slide_path=Path(args.slide), key=key, extra=extra, force=args.force
        )
        summary["out"] = str(path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows, cols = grid.grid_shape
    if mask is None:
        tf = "not used"
    else:
        n = mask.n_regions
        tf = f"{mask.tissue_fraction:.1%} of the slide ({n} region{'s' if n != 1 else ''})"
    print(f"slide      {name}")
    print(f"tissue     {tf}")
    print(
        f"tiles      {len(grid)} of {rows * cols} ({rows} x {cols} grid) with >= "
        f"{grid.min_tissue:g} tissue"
    )
    inked = int((grid.ink_fraction > INKED).sum())
    if mask is not None and mask.ink is not None and mask.ink.any():
        kept = "kept as tissue (--keep-ink)" if args.keep_ink else "left out of the tissue"
        print(f"ink        {mask.ink.mean():.1%} of the slide {kept}; {inked} tile(s) > {INKED:.0%} ink")
    def xy(x: int, y: int | None) -> str:  # "448" for square pixels, "448 x 224" otherwise
        return str(x) if y is None or y == x else f"{x} x {y}"

    print(
        f"geometry   {grid.tile_px} px @ {grid.effective_mpp:.4g} µm/px = "
        f"{xy(grid.tile_size_level0, grid.tile_size_level0_y)} level-0 px, stride "
        f"{xy(grid.stride_level0, grid.stride_level0_y)}, read level {grid.read_level} "
        f"({xy(grid.read_size, grid.read_size_y)} px)"
    )
    if args.out is not None:
        print(f"wrote      {summary['out']}")
    return 0
