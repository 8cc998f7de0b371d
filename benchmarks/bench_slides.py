"""Benchmark slide I/O: synthetic-slide generation, tissue + grid, and batched tile reading.

Usage::

    GPFM_DATA_DIR=../shared/data PYTHONPATH=src python benchmarks/bench_slides.py --size 100000

Generates (or reuses) ``bench_out/synthetic_<size>.svs`` (0.25 µm/px, 2x pyramid), then
times, as the median of ``--repeats`` runs:

* tissue detection + tile grid at 224 px / 0.5 µm/px (target < 3 s at 100k x 100k);
* reading the same ``--tiles`` tiles with a naive loop (one ``OpenSlide.read_region`` per
  tile, RGBA -> RGB), ``read_tiles`` (one thread), and ``TileBatchReader`` with 1 and 2
  workers, run side by side in rotating order, each on a fresh slide handle.

Prints a markdown table of figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gpfm_core.reader import TileBatchReader
from gpfm_core.slide import open_slide
from gpfm_core.synth import make_synthetic_slide
from gpfm_core.tiling import TileGrid, make_tile_grid, read_tiles
from gpfm_core.tissue import detect_tissue

log = logging.getLogger("bench_slides")


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _peak_rss_mib() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _naive(path: Path, grid: TileGrid, idx: np.ndarray) -> None:
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(str(path))
    try:
        for i in idx:
            x, y = grid.coords[i]
            rs = grid.read_size
            img = osr.read_region((int(x), int(y)), grid.read_level, (rs, rs)).convert("RGB")
            if rs != grid.tile_px:
                img = img.resize((grid.tile_px, grid.tile_px), Image.Resampling.BICUBIC)
            np.asarray(img)
    finally:
        osr.close()


def _read_tiles(path: Path, grid: TileGrid, idx: np.ndarray) -> None:
    with open_slide(path) as s:
        read_tiles(s, grid, idx)


def _batched(path: Path, grid: TileGrid, idx: np.ndarray, workers: int, batch: int) -> None:
    with TileBatchReader(path, grid, batch_size=batch, workers=workers, indices=idx) as r:
        for _ in r:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="slide side in px (100000)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiles", type=int, default=1024, help="tiles per reading run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--regenerate", action="store_true", help="write the slide again")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"synthetic_{args.size}.svs"
    rows: list[tuple[str, str, str]] = []
    if args.regenerate or not path.exists():
        t0 = time.perf_counter()
        make_synthetic_slide(path, width=args.size, height=args.size, mpp=0.25, seed=0)
        gen = time.perf_counter() - t0
        mpx = args.size * args.size / 1e6
        rows.append(
            (
                f"make_synthetic_slide {args.size}x{args.size} (1 run)",
                f"{gen:.1f} s",
                f"{mpx / gen:.0f} Mpx/s level 0, {path.stat().st_size / 2**20:.0f} MiB file, "
                f"peak RSS {_peak_rss_mib():.0f} MiB",
            )
        )
    else:
        rows.append(("make_synthetic_slide", "reused", str(path)))

    def tissue_and_grid() -> TileGrid:
        with open_slide(path) as s:
            return make_tile_grid(s, mpp=0.5, tile_px=224, tissue=detect_tissue(s))

    def tissue_only() -> None:
        with open_slide(path) as s:
            detect_tissue(s)

    t_grid, _ = _median_time(tissue_and_grid, args.repeats)
    t_tissue, _ = _median_time(tissue_only, args.repeats)
    grid = tissue_and_grid()
    rows.append(("detect_tissue (8 µm/px mask)", f"{t_tissue:.2f} s", ""))
    rows.append(
        (
            "detect_tissue + make_tile_grid 224 px @ 0.5 µm/px",
            f"{t_grid:.2f} s",
            f"{len(grid)} tiles of {grid.grid_shape[0] * grid.grid_shape[1]}, read level "
            f"{grid.read_level}, target < 3 s",
        )
    )
    rng = np.random.default_rng(0)
    n = min(args.tiles, len(grid))
    idx = np.sort(rng.choice(len(grid), n, replace=False))  # spread over the slide
    methods: dict[str, Callable[[], None]] = {
        "naive loop: OpenSlide.read_region per tile": lambda: _naive(path, grid, idx),
        "read_tiles (1 thread)": lambda: _read_tiles(path, grid, idx),
        "TileBatchReader workers=1": lambda: _batched(path, grid, idx, 1, args.batch_size),
        "TileBatchReader workers=2": lambda: _batched(path, grid, idx, 2, args.batch_size),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(args.repeats):  # rotate the order so caches and load hit all alike
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            methods[k]()
            times[k].append(time.perf_counter() - t0)
    base = n / statistics.median(times[names[0]])
    for k in names:
        rate = n / statistics.median(times[k])
        rows.append((f"{k} ({n} tiles)", f"{rate:.0f} tiles/s", f"{rate / base:.2f}x naive"))

    print()
    print_report(rows, argv, f"median of {args.repeats} runs unless stated", "time / rate")
    return 0


def print_report(
    rows: list[tuple[str, str, str]], argv: list[str] | None, note: str, value: str
) -> None:
    """Print the machine, the command, ``note`` and ``rows`` as a markdown table."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {load[0]:.1f}; Python {platform.python_version()}"
    )
    print(f"command: {' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}")
    print(f"{note}\n")
    print(f"| step | {value} | notes |")
    print("|---|---|---|")
    for step, val, n in rows:
        print(f"| {step} | {val} | {n} |")


if __name__ == "__main__":
    sys.exit(main())
