"""GPU check of the paper-scale step: ViT-L/14 student + one frozen ViT-L expert, batch 32.

Run on a CUDA machine:
    GPFM_DATA_DIR=../shared/data PYTHONPATH=src python benchmarks/gpu_train_check.py
Reports steps/s, tiles/s and peak CUDA memory (bf16 autocast, 2 x 224 px global + 8 x 98 px
local crops, DINO + iBOT + KoLeo + expert CLS/patch losses, AdamW, EMA teacher). The expert is
``timm:vit_large_patch16_224`` with random weights (speed/memory only; no download).
Without CUDA it exits with status 2 and says so; ``--tiny`` runs the same script with a tiny
student/expert on CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FULL = [
    "device=cuda",
    "experts=[{name: 'timm:vit_large_patch16_224', weights: {cls: 1.0, patch: 0.25}, pretrained: false}]",
    "optim.batch_size=32",
    "data.cache_in_memory=true",
    "data.num_workers=8",
]
TINY = [
    "device=cpu",
    "experts=[{name: tiny-expert, weights: {cls: 1.0, patch: 0.25}, pretrained: false}]",
    "optim.batch_size=4",
    "crops.local_crops_number=2",
]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tiny", action="store_true", help="tiny student/expert on CPU (checks the script)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra config key=value"
    )
    args = p.parse_args()
    import torch

    from gpfm_core.train import load_config
    from gpfm_core.train.loop import batches, build, train_step

    if not args.tiny and not torch.cuda.is_available():
        print(
            "gpu_train_check: no CUDA device; run it on a GPU machine, or pass --tiny to check the script on CPU",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(
        "tiny_cpu" if args.tiny else None, overrides=(TINY if args.tiny else FULL) + args.overrides
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = build(cfg, tmp)
        data = batches(state, 0)
        cuda = state.dist.device.type == "cuda"
        for _ in range(3):
            train_step(state, data)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            values = train_step(state, data)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"device {dev}; student {cfg['student']['arch']} ({sum(p.numel() for p in state.model.student.parameters()) / 1e6:.1f} M params), expert {cfg['experts'][0]['name']}"
    )
    print(
        f"batch {state.global_batch}, precision {state.amp_dtype or torch.float32}, loss terms {sorted(k for k in values if k not in ('lr', 'wd', 'momentum', 'teacher_temp', 'grad_norm'))}"
    )
    print(
        f"steps/s {1 / step_s:.3f}  tiles/s {state.global_batch / step_s:.1f}  (median of {args.steps} steps)"
    )
    if cuda:
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
