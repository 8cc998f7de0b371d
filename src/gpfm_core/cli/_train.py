"""``gpfm train``: unified knowledge distillation pretraining (expert + DINOv2 self-distillation)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

HELP = """\
Config layers: the packaged defaults (GPFM's recipe), then --config (a YAML file, or a packaged
name: gpfm = the paper's ViT-L run, see docs/recipe_card.md; tiny_cpu; student_s), then each
--set key=value (values parsed as YAML, e.g. --set optim.base_lr=1e-3
--set 'experts=[{name: uni, weights: {cls: 1.0, patch: 0.25}}]').
The resolved config is written to OUT/config.yaml; metrics to OUT/metrics.csv and
OUT/tensorboard; the checkpoint to OUT/checkpoint.pt; the compiled tile index to
OUT/tiles.tileindex (or data.index); teacher snapshots to OUT/eval/training_<iteration>/ every
train.snapshot_every steps; kNN / linear-probe evaluation to OUT/eval.csv every eval.every steps.
Tiles: --set "data.tile_lists=['DIR/<tiling>/patches']" (gpfm tiles / gpfm embed / TRIDENT /
CLAM .h5, or GPFM's JSON), read by data.num_workers loader processes.
Multi-GPU / multi-process: torchrun --nproc_per_node N -m gpfm_core train ...
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``gpfm train``."""
    p = subparsers.add_parser(
        "train",
        help="distil a student (experts + self-distillation) on tiles of slides",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help="override YAML file or packaged name (gpfm, tiny_cpu, student_s)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="run folder (checkpoint, metrics, config)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train, print where the checkpoint is."""
    from gpfm_core.train.config import dump_config, load_config

    cfg = load_config(args.config, overrides=args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from gpfm_core.train.distributed import shutdown_distributed
    from gpfm_core.train.loop import train

    try:
        state = train(cfg, args.out, resume=args.resume)
    except BaseException:
        shutdown_distributed(wait=False)  # other ranks may never reach a barrier
        raise
    main, step, checkpoint = state.dist.is_main, state.step, state.last_checkpoint
    del state  # the DDP/FSDP model holds the process group: free it before the group goes
    shutdown_distributed()
    if main:
        print(f"trained {step} steps: {checkpoint}")
    return 0
