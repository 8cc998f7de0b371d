"""The training data path at scale: tile-index build, size and start-up; loader throughput.

Run:   GPFM_DATA_DIR=../shared/data PYTHONPATH=src .venv/bin/python benchmarks/bench_train_data.py
Small: ... benchmarks/bench_train_data.py --small     (200 k records, 3 batches; a check it runs)

1. Index. ``--files`` synthetic ``.h5`` tile lists in gpfm's layout holding ``--tiles`` tile
   records in all (made-up coordinates on one synthetic slide) are compiled into a tile index
   (in a fresh process: build time and peak RSS), then a fresh process starts a run from it:
   it maps the index and computes the first micro-batch's tile indices and locations
   ("start"), once from the index alone and once listing the tile lists (which stats every
   list to check the index is current). Targets on the 2-core machine at 10 M records: build
   < 60 s, file <= 200 MB (<= 20 MB per million tiles), start < 5 s.
2. Loader. Tiles of a synthetic slide, augmented with the paper's crops (2 x 224 + 8 x 98
   px) by ``make_batch``: micro-batches per second with ``--workers`` threads (the loop's
   previous ``batches``: a ThreadPoolExecutor) against ``--workers`` DataLoader worker
   processes, side by side, after one warm-up batch each; samples/s = batches/s x batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = r"""
import json, resource, sys, time
from gpfm_core.train.data import build_dataset
t0 = time.perf_counter()
ds = build_dataset({"tile_lists": [sys.argv[1]], "use_sample_data": False}, index=sys.argv[2])
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"build_s": dt, "n": len(ds), "bytes": ds.index.nbytes, "peak_rss_mib": rss}))
"""

START = r"""
import json, sys, time
t0 = time.perf_counter()
from gpfm_core.train.data import build_dataset
from gpfm_core.train.sampler import sample_indices
t1 = time.perf_counter()
data = json.loads(sys.argv[1])
ds = build_dataset(data, index=sys.argv[2])
idx = sample_indices(len(ds), seed=0, step=0, batch_size=96, rank=7, world_size=16)
refs = [ds.index.ref(int(i)) for i in ds.rows(idx)]
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "first": [refs[0].x, refs[0].y]}))
"""


def _child(code: str, *args: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_lists(folder: Path, slide: Path, *, tiles: int, files: int) -> float:
    """``files`` tile lists of ``tiles // files`` records each; returns seconds taken."""
    import h5py
    import numpy as np

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = tiles // files
    for i in range(files):
        with h5py.File(folder / f"slide_{i:05d}_patches.h5", "w") as f:
            f.create_dataset("coords", data=rng.integers(0, 7_000, (per, 2)) // 224 * 224)
            f.attrs.update(
                {
                    "tile_size_level0": 448,
                    "tile_size_level0_y": 448,
                    "stride_level0": 448,
                    "slide_path": str(slide),
                }
            )
    return time.perf_counter() - t0


def bench_index(tmp: Path, slide: Path, *, tiles: int, files: int) -> dict:
    lists = tmp / "lists"
    write_s = write_lists(lists, slide, tiles=tiles, files=files)
    index = tmp / "cohort.tileindex"
    built = _child(BUILD, str(lists), str(index))
    alone = _child(START, json.dumps({"index": str(index), "use_sample_data": False}), str(index))
    listed = _child(START, json.dumps({"tile_lists": [str(lists)]}), str(index))
    return {"write_s": write_s, **built, "start_index_s": alone["start_s"],
            "start_listed_s": listed["start_s"], "import_s": alone["import_s"]}  # fmt: skip


def bench_loader(tmp: Path, slide: Path, *, workers: int, batch: int, batches: int) -> dict:
    import copy

    import torch

    from gpfm_core.train.augment import MultiCropAugment
    from gpfm_core.train.data import build_dataset, make_batch
    from gpfm_core.train.loader import MicroBatches, iterate, make_loader

    torch.set_num_threads(1)
    ds = build_dataset(
        {"sources": [str(slide)], "tile_px": 224, "mpp": 0.5, "min_tissue": 0.25},
        index=tmp / "slide.tileindex",
    )
    aug = MultiCropAugment()  # the paper's crops: 2 x 224 + 8 x 98 px
    kw = {
        "seed": 0,
        "batch_size": batch,
        "patch_size": 14,
        "mask_probability": 0.5,
        "mask_ratio": (0.1, 0.5),
    }
    out = {"tiles": len(ds)}
    # previous loop.batches: a thread pool, 2 x workers batches in flight; one dataset copy
    # per thread (slide handles are per reader)
    local = threading.local()

    def one(step: int) -> dict:
        if not hasattr(local, "ds"):
            local.ds = copy.deepcopy(ds)
        return make_batch(local.ds, aug, step=step, **kw)

    with ThreadPoolExecutor(workers) as pool:
        pool.submit(one, 0).result()  # warm-up
        t0 = time.perf_counter()
        list(pool.map(one, range(1, 1 + batches)))
        out["threads_samples_s"] = batches * batch / (time.perf_counter() - t0)
    loader = make_loader(MicroBatches(ds, aug, **kw), start=0, num_workers=workers, seed=0)
    it = iterate(loader)
    next(it)  # warm-up (starts the workers)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    out["processes_samples_s"] = batches * batch / (time.perf_counter() - t0)
    it.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiles", type=int, default=10_000_000, help="tile records (10 M)")
    p.add_argument("--files", type=int, default=1000, help="tile-list files (1000)")
    p.add_argument("--workers", type=int, default=2, help="threads / worker processes (2)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch size (32)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per mode (8)")
    p.add_argument("--small", action="store_true", help="200 k records, 100 files, 3 batches of 16")
    p.add_argument("--only", choices=("index", "loader"), default=None, help="run one part")
    args = p.parse_args()
    if args.small:
        args.tiles, args.files, args.batches, args.batch = 200_000, 100, 3, 16
    from gpfm_core.synth import make_synthetic_slide

    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        data = os.environ.get("GPFM_DATA_DIR")
        sources = (
            [Path(data) / "cmu_small_region.svs", Path(data) / "he_patch_1000.png"]
            if data
            else None
        )
        slide = make_synthetic_slide(
            tmp / "synthetic.svs", width=8192, height=8192, mpp=0.25, sources=sources, seed=3
        )
        ix = (
            bench_index(tmp, slide, tiles=args.tiles, files=args.files)
            if args.only != "loader"
            else None
        )
        ld = (
            bench_loader(tmp, slide, workers=args.workers, batch=args.batch, batches=args.batches)
            if args.only != "index"
            else None
        )
    if ix is not None:
        print_index(ix, args.files)
    if ld is not None:
        print_loader(ld, args)
    return 0


def print_index(ix: dict, files: int) -> None:
    n = ix["n"]
    mb = ix["bytes"] / 1e6
    print(f"## tile index: {n:,} records in {files} tile lists ({os.cpu_count()} cores)")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| write the .h5 tile lists (setup) | {ix['write_s']:.1f} s | |")
    print(
        f"| build the index (fresh process, after imports) | {ix['build_s']:.1f} s | < 60 s at 10 M |"
    )
    print(f"| peak RSS while building | {ix['peak_rss_mib']:.0f} MiB | |")
    print(f"| index file | {mb:.1f} MB ({mb / (n / 1e6):.1f} MB per million) | <= 200 MB at 10 M |")
    print(
        f"| start: map + first batch's tiles (index alone) | {ix['start_index_s']:.2f} s | < 5 s |"
    )
    print(
        f"| start with the tile lists listed (stat each) | {ix['start_listed_s']:.2f} s | < 5 s |"
    )
    print(f"| import gpfm_core.train.data (not in start) | {ix['import_s']:.2f} s | |")
    print()


def print_loader(ld: dict, args: argparse.Namespace) -> None:
    print(f"## loader: {ld['tiles']} tiles of a synthetic slide, batch {args.batch}, paper crops")
    print(f"| mode ({args.workers} each) | samples/s |")
    print("|---|---|")
    print(f"| threads (previous loop) | {ld['threads_samples_s']:.1f} |")
    print(f"| DataLoader worker processes | {ld['processes_samples_s']:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
