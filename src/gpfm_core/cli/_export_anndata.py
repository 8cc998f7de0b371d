"""``gpfm export-anndata COHORT --out tiles.h5ad``: a cohort's tiles × features for scverse."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm export-anndata``."""
    p = subparsers.add_parser(
        "export-anndata",
        help="write a cohort's tiles x features as AnnData (.h5ad) for scanpy/squidpy",
        description=(
            "Write every tile of a cohort folder (gpfm embed --out FOLDER) as one AnnData "
            "file: X (tiles, D) float32 features; obs slide, x, y (level-0 px), "
            "tissue_fraction and, when asked, cluster (k-means over the cohort) and "
            "prediction / confidence (a linear probe); obsm['spatial'] tile centres."
        ),
    )
    p.add_argument("cohort", help="cohort folder (holds cohort.csv)")
    p.add_argument("--out", required=True, help="the .h5ad file to write")
    p.add_argument("--encoder", default=None, help="encoder name, when the folder holds several")
    p.add_argument(
        "--tiling",
        default=None,
        help="tiling folder name (e.g. 0.5mpp_224px_0px_overlap), when the folder holds several",
    )
    p.add_argument("--slides", nargs="+", default=None, metavar="SLIDE_ID", help="only these")
    p.add_argument("--clusters", type=int, default=None, metavar="K", help="add k-means clusters")
    p.add_argument("--probe", default=None, metavar="FILE", help="linear probe (.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: 0)")
    return p


def run(args: argparse.Namespace) -> int:
    """Export and print what was written."""
    from gpfm_core.cohort import export_anndata, open_cohort

    cohort = open_cohort(args.cohort, encoder=args.encoder, tiling=args.tiling)
    out = export_anndata(
        cohort, args.out, slides=args.slides, clusters=args.clusters, probe=args.probe,
        seed=args.seed,
    )  # fmt: skip
    n = cohort.n_tiles if args.slides is None else sum(cohort.row(s).n_tiles for s in args.slides)
    print(f"{out}: {n} tiles x {cohort.embed_dim} features ({cohort.encoder})")
    return 0
