"""GPU check of GPFM's distillation step at paper scale (issue 12), through the project's loop.

Run on a CUDA machine (``benchmarks/gpu_check.sh`` runs it as its ``train`` part):
    GPFM_DATA_DIR=../shared/data PYTHONPATH=src python benchmarks/gpu_train_check.py

The run is ``load_config("gpfm", overrides=...)`` -> ``gpfm_core.train.loop.build`` ->
``train_step``, single process, bf16 autocast:

* student: the ``gpfm`` recipe's ViT-L/14 (``vit_large_patch14_dinov2``, drop-path 0.4 in
  every block, 65,536 prototypes, 2 x 224 px global + 8 x 98 px local crops, iBOT masks,
  EMA teacher, AdamW), random init (``student.init_weights=null``);
* experts: the recipe's three, all ``pretrained: false`` (random weights, nothing read or
  downloaded), each fed the student's 224 px global crop (``input: crop``, as GPFM):
  ``uni`` (timm ViT-L/16, 1024-d CLS + patch targets), ``phikon`` (ViT-B/16, 768-d CLS +
  patch) and CONCH (ViT-B/16 image tower, the projected 512-d contrastive embedding). CONCH is
  the authors' ``conch`` package when it imports and builds (carry its wheel, see
  gpu_check.sh); else ``conch-shaped``, registered here: CONCH's image tower (timm ViT-B/16 at
  448 px with dynamic size, CoCa's contrastive pooler -> LayerNorm -> 512 x 512 projection,
  and the 256-query caption pooler that CONCH's ``encode_image`` also runs; the same
  parameter names and shapes as ``conch`` 0.1.0's ``visual``, 90.4 M) wrapped in the
  project's ``ConchEncoder``. It lacks CONCH's text towers (305 M parameters that training
  never runs), so peak memory is about 1.1 GiB lower than with the real package.

For each batch size per GPU (``--batches``, default 32 and 96): ``--distinct`` micro-batches
are built by the project's DataLoader (``gpfm_core.train.loop.batches``, sample images) and
cycled, so the timing is of the GPU step, not of augmentation; ``--warmup`` steps, then
``--steps`` timed steps (synchronised). Prints a markdown table: steps/s, tiles/s, median /
min / max step time, peak CUDA memory allocated and reserved (reset after warm-up, so it
includes weights and AdamW state). Also: how many samples/s one loader process augments,
hence how many worker processes a GPU needs at the measured rate, and the GPU-hours of
GPFM's run (87,500 steps on 16 GPUs) at that rate. A batch size that does not fit is
reported as OOM and the next one still runs.

``--budget-s`` (``gpu_check.sh`` passes the part's budget): a batch size that would not fit
(1.25 x the last one's time, scaled by the batch) is listed as not run, and the timed steps stop
early (at least 3) when the budget runs short; each size's figures are also printed as soon as
measured.

``--tiny`` runs the same script on CPU (fp32): a tiny student and heads, batch 2, and the same
three full-size random experts (their builders are what the dry run checks), one step and no warm-up.
Without CUDA (and without ``--tiny``) it exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONCH_SHAPED = "conch-shaped"
#: GPFM's released model: the teacher at iteration 87,499 of a run on 2 nodes x 8 GPUs.
GPFM_STEPS, GPFM_GPUS = 87_500, 16

FULL = [
    "device=cuda",
    "student.init_weights=null",  # random init: the speed and memory are the same
    "train.precision=bf16",
    # the two sample images, cached: the timed steps cycle prebuilt batches anyway
    "data.use_sample_data=true",
    "data.mpp=0.5",
    "data.tile_px=224",
    "data.cache_in_memory=true",
]
TINY = [
    "device=cpu",
    "train.precision=fp32",  # the recipe's fp16 autocast crawls on CPU
    "student.init_weights=null",
    "student.kwargs={img_size: 224, embed_dim: 64, depth: 2, num_heads: 2, init_values: 1.0e-5}",
    "student.drop_path_rate=0.1",
    "dino.n_prototypes=256",
    "dino.hidden_dim=128",
    "dino.bottleneck_dim=64",
    "ibot.n_prototypes=256",
    "expert_head.hidden_dim=64",
    # 224 px global crops, as on the GPU: Phikon (fixed input size) sees them as they are
    "crops.global_crops_size=224",
    "crops.local_crops_number=2",
    "crops.local_crops_size=42",
    "data.use_sample_data=true",
    "data.mpp=0.5",
    "data.tile_px=224",
    "data.cache_in_memory=true",
]


def register_conch_shaped() -> str:
    """Register ``conch-shaped`` (CONCH's image tower with random weights); returns the name."""
    from gpfm_core.encoders import register_encoder
    from gpfm_core.encoders._registry import is_registered
    from gpfm_core.encoders.experts import CONCH_META

    if not is_registered(CONCH_SHAPED):
        meta = CONCH_META.replace(
            name=CONCH_SHAPED,
            family="test",
            arch="CONCH-shaped ViT-B/16 tower (timm) + CoCa poolers, random init",
            description="CONCH's image tower shape with random weights (benchmarks only)",
            weights_required=False,
            hf_repo=None,
            hf_filename=None,
        )
        register_encoder(CONCH_SHAPED, meta=meta)(_build_conch_shaped)
    return CONCH_SHAPED


def _build_conch_shaped(
    *, pretrained: bool = False, weights: Path | None = None, seed: int = 0, **kw: Any
) -> Any:
    """The ``conch-shaped`` builder (random weights only)."""
    import torch

    from gpfm_core.encoders._conch import ConchEncoder, conch_shaped_model
    from gpfm_core.encoders._registry import get_encoder_meta
    from gpfm_core.errors import EncoderError

    if pretrained or weights is not None or kw:
        raise EncoderError(f"{CONCH_SHAPED} has random weights only: set pretrained: false")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = conch_shaped_model()  # CONCH's sizes
    meta = get_encoder_meta(CONCH_SHAPED)
    return ConchEncoder(model, meta, weights_hash=f"random-init-seed{seed}", arch=meta.arch)


def expert_specs() -> list[dict[str, Any]]:
    """The ``gpfm`` recipe's experts with random weights (CONCH-shaped without ``conch``)."""
    from gpfm_core.encoders.experts import conch_available
    from gpfm_core.train import load_config

    specs = []
    for e in load_config("gpfm")["experts"]:
        e = {**e, "pretrained": False}
        if e["name"] == "conch":
            why = _conch_unusable() if conch_available() else "package conch not installed"
            if why:
                print(f"conch: {why}; measuring {CONCH_SHAPED} instead", flush=True)
                e["name"] = register_conch_shaped()
        specs.append(e)
    return specs


def _conch_unusable() -> str | None:
    """Why the ``conch`` expert cannot be built here (a weight-less skeleton), or None."""
    from gpfm_core.encoders import create_encoder

    try:
        create_encoder("conch", pretrained=False, device="meta")
    except Exception as exc:  # any failure of the authors' code: fall back, say why
        return f"cannot build ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return None


def _take(state: Any, *, batch: int, n: int, workers: int, start: int) -> list[dict[str, Any]]:
    """``n`` micro-batches of ``batch`` tiles from the project's loader (``workers`` processes)."""
    from gpfm_core.train.loop import batches

    state.cfg["optim"]["batch_size"] = batch
    state.cfg["data"]["num_workers"] = workers
    data = batches(state, start)
    try:
        return [next(data) for _ in range(n)]
    finally:
        data.close()


def _time_steps(
    state: Any, pool: list[dict[str, Any]], *, warmup: int, steps: int, budget: Any
) -> dict[str, Any]:
    """Median step time of ``steps`` steps after ``warmup``; fewer (at least 3) near the budget."""
    import torch

    from gpfm_core.train.loop import train_step

    cuda = state.dist.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data = itertools.cycle(pool)
    values: dict[str, float] = {}
    for _ in range(warmup):
        values = train_step(state, data)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    for _ in range(steps):
        if len(times) >= 3 and not budget.allows(2 * max(times)):
            break
        t0 = time.perf_counter()
        values = train_step(state, data)
        sync()
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "steps": len(times),
        "step_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "loss": values.get("total", float("nan")),
    }
    if cuda:
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="CPU dry run of the script")
    p.add_argument("--batches", default=None, help="batch sizes per GPU (default: 32,96)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 3)")
    p.add_argument("--distinct", type=int, default=None, help="prebuilt micro-batches (default: 4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config key=value")
    p.add_argument("--md", type=Path, default=None, help="append the table to this file")
    p.add_argument("--budget-s", type=float, default=None, help="stop cleanly within this time")
    args = p.parse_args(argv)
    from gpu_check import Budget

    budget = Budget(args.budget_s)
    import torch

    from gpfm_core.train import load_config
    from gpfm_core.train.loop import build

    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        print(
            "gpu_train_check: no CUDA device; run it on a GPU machine, or pass --tiny for the CPU dry run",
            file=sys.stderr,
        )
        return 2
    sizes = [int(b) for b in (args.batches or ("2" if args.tiny else "32,96")).split(",")]
    steps = args.steps or (1 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 3)
    distinct = args.distinct or (2 if args.tiny else 4)
    specs = expert_specs()
    overrides = [
        *(TINY if args.tiny else FULL),
        f"optim.batch_size={max(sizes)}",
        f"experts={json.dumps(specs)}",
        *args.overrides,
    ]
    cfg = load_config("gpfm", overrides=overrides)
    t0 = time.perf_counter()
    rows: list[tuple[int, dict[str, Any] | None]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_train_check_") as tmp:
        state = build(cfg, tmp)
        built = time.perf_counter() - t0
        model = state.model
        n_student = sum(q.numel() for q in model.student["backbone"].parameters()) / 1e6
        experts = ", ".join(
            f"{e.name} ({e.encoder.meta.arch}, {e.target} {e.embed_dim}-d, "
            f"{sum(q.numel() for q in e.encoder.parameters()) / 1e6:.0f} M)"
            for e in model.experts
        )
        dev = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"device {dev}; torch {torch.__version__}; built in {built:.0f} s", flush=True)
        print(f"student {cfg['student']['arch']} ({n_student:.1f} M params); experts: {experts}")
        print(
            f"precision {state.amp_dtype or torch.float32}; loss terms {sorted(model.loss_weights())}"
        )
        # one loader process: samples/s it augments (a second batch built in this process:
        # the first one also fills the tile cache)
        _take(state, batch=sizes[0], n=1, workers=0, start=0)
        t1 = time.perf_counter()
        _take(state, batch=sizes[0], n=1, workers=0, start=1)
        per_process = sizes[0] / (time.perf_counter() - t1)
        workers = min(distinct, 8)
        last: tuple[int, float] | None = None  # (batch, seconds) of the last measured size
        for b in sizes:
            # a size takes about (b / last batch) x the last one's time; the first always runs
            if last is not None and not budget.allows(1.25 * last[1] * b / last[0]):
                print(f"batch {b}: not run, {max(0.0, budget.left()):.0f} s of the budget left")
                rows.append((b, {"skipped": True}))
                continue
            pool: list[dict[str, Any]] = []
            try:
                t1 = time.perf_counter()
                pool = _take(state, batch=b, n=distinct, workers=workers, start=2)
                prep = time.perf_counter() - t1
                res = _time_steps(state, pool, warmup=warmup, steps=steps, budget=budget)
                res["prep_s"] = prep
                rows.append((b, res))
                last = (b, time.perf_counter() - t1)
                print(
                    f"batch {b}: {1 / res['step_s']:.3g} steps/s, {b / res['step_s']:.3g} tiles/s, "
                    f"peak {res.get('peak_alloc_gib', float('nan')):.1f} GiB allocated, "
                    f"loss {res['loss']:.3f} ({distinct} batches built in {prep:.1f} s)",
                    flush=True,
                )
            except torch.cuda.OutOfMemoryError as exc:
                print(f"batch {b}: OOM ({str(exc).splitlines()[0][:160]})", flush=True)
                rows.append((b, None))
            finally:
                pool = []
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
        state.dataset.close()

    prec = f"{str(state.amp_dtype).removeprefix('torch.')} autocast" if state.amp_dtype else "fp32"
    lines = [
        f"\nGPFM distillation step ({dev}, {prec}, {n_student:.1f} M-param student, "
        f"{len(model.experts)} random experts; median of up to {steps} steps after {warmup} "
        "warm-up)\n",
        "| batch / GPU | steps/s | tiles/s | step ms (median, min-max; steps) | peak alloc GiB | "
        "peak reserved GiB | GPFM run: GPU-h (h on 16 GPUs) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b, r in rows:
        if r is None or "skipped" in r:
            lines.append(f"| {b} | {'OOM' if r is None else 'not run: budget'} | | | | | |")
            continue
        gpu_h = GPFM_STEPS * GPFM_GPUS * r["step_s"] / 3600 * (96 / b)  # same tiles as 96/GPU
        mem = (
            f"{r['peak_alloc_gib']:.1f} | {r['peak_reserved_gib']:.1f}"
            if "peak_alloc_gib" in r
            else "n/a | n/a"
        )
        lines.append(
            f"| {b} | {1 / r['step_s']:.3g} | {b / r['step_s']:.4g} | {1000 * r['step_s']:.0f} "
            f"({1000 * r['min_s']:.0f}-{1000 * r['max_s']:.0f}; {r['steps']}) | {mem} | "
            f"{gpu_h:,.0f} ({gpu_h / GPFM_GPUS:,.1f}) |"
        )
    best = max((b / r["step_s"] for b, r in rows if r is not None and "step_s" in r), default=0.0)
    lines.append(
        f"\nloader: one process augments {per_process:.1f} samples/s (2 global + "
        f"{cfg['crops']['local_crops_number']} local crops each), so {best:.4g} tiles/s needs "
        f">= {best / max(per_process, 1e-9):.1f} worker processes per GPU (data.num_workers)."
    )
    lines.append(
        "GPU-h: 87,500 steps x 16 GPUs at this step time, scaled to GPFM's 96 tiles/GPU/step; "
        "no communication counted."
    )
    text = "\n".join(lines)
    print(text, flush=True)
    if args.md is not None:
        from gpu_check import append_md

        append_md(args.md, text)
    return 0 if all(r is not None and "step_s" in r for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
