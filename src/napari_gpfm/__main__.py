"""``napari-gpfm`` console script: ``napari-gpfm demo [--out DIR] [--screenshot PATH]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-gpfm", description="napari-gpfm tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="open napari with the sample slide, tissue and tiles")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument(
        "--screenshot",
        default=None,
        metavar="PATH",
        help="render the viewer to this PNG and exit (no person needed)",
    )
    demo.add_argument("--slide", default=None, help="slide to show instead of the sample")
    demo.add_argument(
        "--no-analysis",
        action="store_true",
        help="only the slide, tissue and tile grid (no embedding, clusters or similarity)",
    )
    demo.add_argument("--encoder", default=None, help="encoder for the demo (default: default)")
    demo.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    from napari_gpfm._demo import run_demo

    return run_demo(
        out_dir=args.out,
        screenshot=args.screenshot,
        slide_path=args.slide,
        analysis=not args.no_analysis,
        encoder=args.encoder,
    )


if __name__ == "__main__":
    sys.exit(main())
