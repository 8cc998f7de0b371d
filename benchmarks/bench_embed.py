"""Embedding throughput on CPU: end-to-end pipeline vs model-only vs a naive loop.

Three ways to embed the same fixed block of tiles of a generated 20,000 x 20,000 px slide
(0.25 µm/px, tiles of 224 px at 0.5 µm/px) with a ViT-S/14-sized encoder
(``timm:vit_small_patch14_dinov2`` at 224 px, random init), measured side by side in one
process, interleaved, median of ``--runs``:

* **model-only** - the encoder on pre-loaded, pre-normalised tensors at the same batch
  size: the ceiling;
* **end-to-end** - :func:`gpfm_core.embed.embed_slide` (threaded reads with prefetch,
  preprocess, model, HDF5 write, atomic rename; tissue given as a mask, reuse off);
* **naive** - one ``read_region`` per tile, sequential, no prefetch, then the same
  preprocess / model / HDF5 write;
* and, for scale, reading alone: the threaded reader vs one ``read_region`` per tile.

Target: end-to-end >= 0.9 x model-only. Run::

    GPFM_DATA_DIR=../shared/data PYTHONPATH=src .venv/bin/python benchmarks/bench_embed.py

The slide is generated once into ``bench_out/`` (git-ignored) and reused.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_embed")

ROOT = Path(__file__).resolve().parents[1]


def ensure_slide(path: Path, size: int) -> Path:
    """Generate the synthetic slide once (cached)."""
    from gpfm_core.synth import make_synthetic_slide

    if not path.is_file():
        log.warning("generating %s (%d x %d px, once)", path, size, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        make_synthetic_slide(path, width=size, height=size, mpp=0.25)
    return path


def block_mask(
    slide: Any, *, tiles: int, mpp: float, tile_px: int, cols: int = 24
) -> tuple[Any, int]:
    """A tissue mask selecting a block of about ``tiles`` tiles in the slide's centre.

    Returns
    -------
    (TissueMask, int)
        The mask (level-0 pixels per mask pixel: 16) and the exact number of tiles it selects.
    """
    from gpfm_core.tiling import make_tile_grid
    from gpfm_core.tissue import TissueMask

    full = make_tile_grid(slide, mpp=mpp, tile_px=tile_px, tissue=False)
    rows_total, cols_total = full.grid_shape
    c = min(cols, cols_total)
    r = min(math.ceil(tiles / c), rows_total)
    r0, c0 = (rows_total - r) // 2, (cols_total - c) // 2
    w, h = slide.dimensions
    ds = 16
    mask = np.zeros((math.ceil(h / ds), math.ceil(w / ds)), dtype=bool)
    s = full.stride_level0
    mask[r0 * s // ds : (r0 + r) * s // ds, c0 * s // ds : (c0 + c) * s // ds] = True
    return TissueMask.from_array(mask, level0_size=(w, h)), r * c


def timed(fn: Callable[[], int]) -> float:
    """Tiles per second of one call of ``fn`` (which returns the tiles it did)."""
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path, default=ROOT / "bench_out" / "synthetic_20k.svs")
    p.add_argument("--size", type=int, default=20_000, help="side of the generated slide in px")
    p.add_argument("--tiles", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--arch", default="vit_small_patch14_dinov2")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "bench_embed.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import h5py
    import torch

    from gpfm_core.embed import embed_slide
    from gpfm_core.encoders import create_encoder, preprocess
    from gpfm_core.reader import TileBatchReader
    from gpfm_core.slide import open_slide
    from gpfm_core.tiling import make_tile_grid, read_one_tile, read_tiles

    slide_path = ensure_slide(args.slide, args.size)
    enc = create_encoder(f"timm:{args.arch}", pretrained=False, img_size=224, device="cpu")
    mpp, tile_px, bs = enc.meta.tile_mpp, enc.meta.tile_px, args.batch_size
    with open_slide(slide_path) as slide:
        mask, n = block_mask(slide, tiles=args.tiles, mpp=mpp, tile_px=tile_px)
        grid = make_tile_grid(slide, mpp=mpp, tile_px=tile_px, min_tissue=0.5, tissue=mask)
        assert len(grid) == n, (len(grid), n)
        x0 = preprocess(read_tiles(slide, grid, np.arange(bs)), enc.meta)
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_", dir=args.out.parent))

    def model_only() -> int:
        with torch.inference_mode():
            for _ in range(math.ceil(n / bs)):
                enc(x0)
        return math.ceil(n / bs) * bs

    def end_to_end() -> int:
        embed_slide(
            slide_path, encoder=enc, out_dir=tmp, mpp=mpp, tile_px=tile_px, tissue=mask, min_tissue=0.5,
            device="cpu", batch_size=bs, workers=args.workers, reuse=False,
        )  # fmt: skip
        return n

    def naive() -> int:
        with open_slide(slide_path) as slide, h5py.File(tmp / "naive.h5", "w") as f:
            ds = f.create_dataset("features", shape=(n, enc.meta.embed_dim), dtype="float32")
            with torch.inference_mode():
                for start in range(0, n, bs):
                    idx = range(start, min(start + bs, n))
                    tiles = np.stack([read_one_tile(slide, grid, i) for i in idx])
                    ds[start : start + len(idx)] = enc(preprocess(tiles, enc.meta)).numpy()
        return n

    def reader_only() -> int:
        with TileBatchReader(slide_path, grid, batch_size=bs, workers=args.workers) as reader:
            return sum(len(idx) for idx, _ in reader)

    def sequential_reads() -> int:
        with open_slide(slide_path) as slide:
            for i in range(n):
                read_one_tile(slide, grid, i)
        return n

    modes = {"model-only (pre-loaded tensors)": model_only, "end-to-end embed_slide": end_to_end}
    modes["naive (read_region per tile, sequential)"] = naive
    modes[f"(reads only: TileBatchReader, {args.workers} threads)"] = reader_only
    modes["(reads only: read_region per tile, sequential)"] = sequential_reads
    model_only()  # warm-up
    results: dict[str, list[float]] = {k: [] for k in modes}
    for run in range(args.runs):
        for name, fn in modes.items():
            results[name].append(timed(fn))
            log.warning("run %d %-42s %.1f tiles/s", run + 1, name, results[name][-1])
    med = {k: statistics.median(v) for k, v in results.items()}
    ref = med["model-only (pre-loaded tensors)"]
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    lines = [
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)",
        f"command: `{cmd}`",
        f"encoder: timm:{args.arch} @ {enc.meta.input_px} px (D={enc.meta.embed_dim}, random init); "
        f"slide {args.size}x{args.size} px @ 0.25 µm/px; {n} tiles of {tile_px} px @ {mpp} µm/px; "
        f"batch {bs}; {args.workers} reader threads; median of {args.runs} runs",
        "",
        "| pipeline | tiles/s (median) | runs | x model-only |",
        "| --- | ---: | --- | ---: |",
    ]
    for name, v in med.items():
        runs = ", ".join(f"{r:.1f}" for r in results[name])
        lines.append(f"| {name} | {v:.1f} | {runs} | {v / ref:.2f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
