"""``gpfm make-slide``: write a synthetic pyramidal whole-slide image for demos and benchmarks."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

HELP = "write a synthetic tiled pyramidal slide (mosaic of real H&E) that OpenSlide reads"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm make-slide OUT --width --height [--mpp] [--seed] ...``."""
    p = subparsers.add_parser("make-slide", help=HELP, description=HELP)
    p.add_argument("out", type=Path, help="output .svs or .tif")
    p.add_argument("--width", type=int, required=True, help="level-0 width, px")
    p.add_argument("--height", type=int, required=True, help="level-0 height, px")
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of level 0 (0.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--tile", type=int, default=512, help="TIFF tile size (512)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality (85)")
    p.add_argument("--level-factor", type=int, default=2, choices=(2, 4), help="level step (2)")
    p.add_argument(
        "--source",
        action="append",
        type=Path,
        default=None,
        help="tissue image to mosaic (repeatable; default: GPFM_DATA_DIR samples)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Write the slide and print where; returns 0."""
    from gpfm_core.synth import make_synthetic_slide

    t0 = time.perf_counter()
    path = make_synthetic_slide(
        args.out,
        width=args.width,
        height=args.height,
        mpp=args.mpp,
        tile=args.tile,
        sources=args.source,
        seed=args.seed,
        quality=args.quality,
        level_factor=args.level_factor,
    )
    mib = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({args.width} x {args.height} px @ {args.mpp:g} µm/px, "
        f"{mib:.1f} MiB, {time.perf_counter() - t0:.1f} s)"
    )
    return 0
