"""``gpfm embed SLIDE... --encoder NAME|PATH``: one feature file per slide, TRIDENT's layout.

``<out>/<mpp>mpp_<tile_px>px_<overlap>px_overlap/features_<encoder>-<hash8>/<slide_stem>.h5``
(see :mod:`gpfm_core.embed.layout`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gpfm_core.cli._tiles import add_tissue_arguments, tissue_options

DEFAULT_OUT = "gpfm_embeddings"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm embed``."""
    p = subparsers.add_parser(
        "embed",
        help="embed every tissue tile of one or more slides (TRIDENT/CLAM HDF5)",
        description=(
            "Embed every tissue tile of each slide with an encoder and write "
            "<out>/<mpp>mpp_<tile>px_<overlap>px_overlap/features_<encoder>-<hash8>/"
            "<slide_stem>.h5 (datasets features (N, D), coords (N, 2) level-0 x,y); a second "
            "slide with the same stem gets <slide_stem>-<slide id>.h5. A slide embedded by "
            "another process at the same time is waited for and reused. A slide that fails "
            "is reported and the others continue; the exit status is 1 if any failed."
        ),
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument(
        "--encoder",
        default="default",
        help="registry name or checkpoint path (default: %(default)s)",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="weights file for --encoder, e.g. --encoder timm:NAME --weights FILE "
        "(wins over GPFM_WEIGHTS and the Hugging Face cache)",
    )
    p.add_argument(
        "--mpp", type=float, default=None, help="µm/px of the tiles (default: the encoder's)"
    )
    p.add_argument(
        "--tile-px",
        type=int,
        default=None,
        help="tile side in px at --mpp (default: the encoder's)",
    )
    p.add_argument("--overlap", type=int, default=0, help="overlap between tiles in px at --mpp")
    p.add_argument(
        "--min-tissue", type=float, default=0.25, help="least tissue fraction kept (default: 0.25)"
    )
    p.add_argument(
        "--slide-mpp", type=float, default=None, help="override the slides' level-0 µm/px"
    )
    add_tissue_arguments(p)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: ./%(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="compute precision",
    )
    p.add_argument("--batch-size", type=int, default=64, help="tiles per batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="reader threads (default: 2)")
    p.add_argument("--fp16", action="store_true", help="store features as float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument(
        "--no-reuse", action="store_true", help="recompute even if a matching file exists"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a slide's file made with other settings (tissue detector, min tissue ...)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Embed the slides; returns 0 when all worked, 1 when any failed."""
    from tqdm import tqdm

    from gpfm_core.embed import SlideOutcome, embed_slides

    bars: dict[Path, Any] = {}
    total_slides = len(args.slides)

    def progress(slide: Path, done: int, total: int) -> None:
        bar = bars.get(slide)
        if bar is None:
            idx = (
                [Path(s) for s in args.slides].index(slide) + 1
                if slide in map(Path, args.slides)
                else 0
            )
            bar = bars[slide] = tqdm(
                total=total,
                desc=f"[{idx}/{total_slides}] {slide.name}",
                unit="tile",
                file=sys.stderr,
                disable=args.quiet,
                leave=True,
            )
        bar.update(done - bar.n)

    def on_result(o: SlideOutcome) -> None:
        bar = bars.pop(o.slide, None)
        if bar is not None:
            bar.close()
        if o.result is None:
            print(f"FAILED {o.slide}: {o.error}", file=sys.stderr)
            return
        r = o.result
        how = "reused existing file" if r.reused else f"{r.tiles_per_s:.1f} tiles/s"
        print(f"{o.slide} -> {r.path} ({r.n_tiles} tiles, {how})")

    encoder: Any = args.encoder
    if args.weights is not None:
        from gpfm_core.encoders import create_encoder

        # built here on the CPU; embed_slides moves it to --device
        encoder = create_encoder(args.encoder, weights=args.weights, device="cpu")
    outcomes = embed_slides(
        args.slides,
        encoder=encoder,
        out_dir=args.out,
        mpp=args.mpp,
        tile_px=args.tile_px,
        overlap_px=args.overlap,
        min_tissue=args.min_tissue,
        tissue_options=tissue_options(args),
        slide_mpp=args.slide_mpp,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        dtype="float16" if args.fp16 else "float32",
        compile=args.compile,
        reuse=not args.no_reuse,
        force=args.force,
        progress=progress,
        on_result=on_result,
    )
    done = [o.result for o in outcomes if o.result is not None]
    if done:
        r = done[0]
        print(f"encoder: {r.encoder} (weights {r.weights_hash[:16]}) on {r.device} [{r.precision}]")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"gpfm embed: {len(failed)} of {len(outcomes)} slide(s) failed", file=sys.stderr)
        return 1
    return 0
