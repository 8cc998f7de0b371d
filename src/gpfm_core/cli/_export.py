"""``gpfm export``: write the EMA teacher of a training checkpoint or snapshot as an encoder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``gpfm export``."""
    p = subparsers.add_parser(
        "export",
        help="export a gpfm train checkpoint or teacher snapshot as an encoder (.safetensors)",
        description="The exported file loads with create_encoder(PATH) and `gpfm embed --encoder PATH`.",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        help="checkpoint.pt written by gpfm train, or a teacher snapshot: the run's "
        "eval/training_<N> folder (or its teacher_checkpoint.pth)",
    )
    p.add_argument("--out", required=True, type=Path, help="destination .safetensors")
    p.add_argument(
        "--name", default=None, help="encoder name stored in the file (default: file stem)"
    )
    p.add_argument(
        "--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="weight precision"
    )
    p.add_argument("--license", default="unknown", help="licence string stored in the metadata")
    return p


def run(args: argparse.Namespace) -> int:
    """Export and print the destination."""
    from gpfm_core.train.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint, args.out, name=args.name, dtype=args.dtype, license=args.license
    )
    print(out)
    return 0
