"""``gpfm train-mil ITEMS.csv --features DIR --out MODEL.safetensors``: one ABMIL slide model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gpfm_core.cli._eval import TRAIN_MIL_HELP


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm train-mil``."""
    p = subparsers.add_parser(
        "train-mil",
        help="train an ABMIL slide model (classification or survival) on cohort features",
        description=TRAIN_MIL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("items", metavar="ITEMS.csv", help="one row per slide")
    p.add_argument("--features", required=True, help="folder of <slide_id>.h5 feature files")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.add_argument(
        "--task",
        choices=["classification", "survival"],
        default="classification",
        help="model type",
    )
    p.add_argument("--label-col", default="label", help="class column (default: %(default)s)")
    p.add_argument("--classes", default=None, help="comma-separated class order (default: sorted)")
    p.add_argument(
        "--val-fraction", type=float, default=0.2, help="validation share without a split column"
    )
    p.add_argument("--epochs", type=int, default=None, help="most epochs (default: 50)")
    p.add_argument(
        "--patience", type=int, default=None, help="early-stopping patience (default: 10)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    p.add_argument("--missing", choices=["error", "skip"], default="error",
                   help="slides without a features file: fail, or leave them out")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    """Train, save, print the validation (and test) metrics."""
    from gpfm_core.evaluation import MILConfig, train_slide_model

    out = Path(args.out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    overrides = {
        k: v for k, v in (("max_epochs", args.epochs), ("patience", args.patience)) if v is not None
    }
    result = train_slide_model(
        args.items,
        features=args.features,
        task=args.task,
        label_col=args.label_col,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        val_fraction=args.val_fraction,
        config=MILConfig(**overrides),
        seed=args.seed,
        missing=args.missing,
        out=out,
        progress=lambda e, n, loss: print(f"epoch {e}/{n}: val loss {loss:.4f}", flush=True),
    )
    m = result.model
    print(
        f"model: {out} ({m.task}, {m.embed_dim}-d features of {m.encoder}, "
        f"best epoch {m.training['best_epoch']} of {m.training['epochs']})"
    )
    for split, metrics in result.metrics.items():
        text = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        print(f"{split}: {text}")
    return 0
