"""Benchmark: open a huge slide in napari, first frame, memory, and panning to unseen tissue.

Run under a display (``xvfb-run -a python benchmarks/bench_napari_open.py``). The slide
is a generated pyramidal TIFF (``gpfm_core.synth.make_synthetic_slide``) cached as
``bench_out/synthetic_<size>.tiff`` (``bench_out/synthetic_100k.tiff`` for the default
100,000 px, shared with the slide benchmarks).

Each run is a fresh Python process (so napari's chunk cache is cold; the OS file cache is
warm after the first run) that:

1. makes a shown viewer and draws a tiny image once (excluded: napari/GL start-up);
2. **open -> first frame**: ``viewer.open(path, plugin="napari-gpfm")`` then
   ``viewer.screenshot(canvas_only=True)``, which renders the canvas with the overview;
3. **RSS**: resident memory after step 2 minus before it (psutil);
4. **pan**: for each of ``--pans`` random unseen spots, the camera jumps there at full
   resolution (1 screen px = 1 level-0 px) and the canvas is rendered again; the time from
   the camera change to the finished render is "pan -> frame", and the time dask takes to
   fetch one level-0 chunk never read before is "chunk fetch" (both medians).

Targets: first frame <= 1.5 s, RSS <= 300 MB, chunk fetch median <= 50 ms.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_napari_open")

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"first_frame_s": 1.5, "rss_mb": 300.0, "chunk_ms": 50.0}


def slide_path(size: int, out_dir: Path) -> Path:
    """The cached synthetic slide of ``size`` x ``size`` px, generated when missing.

    Reuses ``synthetic_100k.tiff`` / ``synthetic_100000.svs`` ... written by the slide
    benchmarks when present.
    """
    names = [f"synthetic_{size}.tiff", f"synthetic_{size}.svs"]
    if size % 1000 == 0:
        names = [f"synthetic_{size // 1000}k.tiff", f"synthetic_{size // 1000}k.svs", *names]
    found = [out_dir / n for n in names if (out_dir / n).exists()]
    path = found[0] if found else out_dir / names[0]
    if not found:
        from gpfm_core.synth import make_synthetic_slide

        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_synthetic_slide(path, width=size, height=size, mpp=0.25, tile=512)
        log.warning("generated %s in %.0f s", path, time.perf_counter() - t0)
    return path


def _process_events(n: int = 3) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()


def _empty_dask_cache() -> None:
    from napari.utils import _dask_utils

    cache = _dask_utils._DASK_CACHE.cache
    size = cache.available_bytes
    cache.resize(0)
    cache.resize(size)


def child(path: Path, *, pans: int, seed: int, backend: str) -> dict[str, Any]:
    """One measurement run in this process (see the module docstring)."""
    import numpy as np
    import psutil

    import napari
    from napari_gpfm import _reader
    from napari_gpfm._layers import viewer_camera
    from napari_gpfm._pyramid import build_pyramid

    proc = psutil.Process()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    warm = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True)
    viewer.screenshot(canvas_only=True, flash=False)
    viewer.layers.remove(warm)
    _process_events()
    gc.collect()
    rss0 = proc.memory_info().rss

    if backend == "array":  # swap the level type the reader builds (same reads, no dask)
        orig = _reader.build_pyramid
        _reader.build_pyramid = lambda s, **kw: orig(s, backend="array", **kw)  # type: ignore[assignment]

    def open_and_draw() -> tuple[Any, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        (lay,) = viewer.open(str(path), plugin="napari-gpfm")
        shot = viewer.screenshot(canvas_only=True, flash=False)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert shot[..., :3].std() > 5, "first frame is blank"
        return lay, dt, dc

    # cold: the first slide of a napari session (imports dask/openslide on the way)
    layer, first_cold, cpu_cold = open_and_draw()
    rss1 = proc.memory_info().rss
    # warm: another slide later in the session (plugin imported, chunk cache emptied)
    viewer.layers.remove(layer)
    _empty_dask_cache()
    _process_events()
    layer, first_warm, cpu_warm = open_and_draw()

    slide = _reader.slide_for_layer(layer)
    assert slide is not None
    mx, my = slide.mpp
    w0, h0 = slide.dimensions
    rng = np.random.default_rng(seed)
    pan_s: list[float] = []
    levels_seen: list[int] = []
    for _ in range(pans):
        x, y = rng.integers(2000, w0 - 2000), rng.integers(2000, h0 - 2000)
        t = time.perf_counter()
        viewer_camera(viewer).center = (y * my, x * mx)
        viewer_camera(viewer).zoom = 1.0 / mx
        viewer.screenshot(canvas_only=True, flash=False)
        pan_s.append(time.perf_counter() - t)
        levels_seen.append(int(layer.data_level))

    # chunk fetch: fresh pyramids so no chunk was read before (dask vs bare array)
    pyr_d = build_pyramid(slide, backend="dask")
    pyr_a = build_pyramid(slide, backend="array")
    cy, cx = pyr_d.chunks[0]
    chunk_d: list[float] = []
    chunk_a: list[float] = []
    for _ in range(pans):
        r, c = rng.integers(0, h0 // cy - 1), rng.integers(0, w0 // cx - 1)
        t = time.perf_counter()
        np.asarray(pyr_d.levels[0][r * cy : (r + 1) * cy, c * cx : (c + 1) * cx])
        chunk_d.append(time.perf_counter() - t)
        r, c = rng.integers(0, h0 // cy - 1), rng.integers(0, w0 // cx - 1)
        t = time.perf_counter()
        np.asarray(pyr_a.levels[0][r * cy : (r + 1) * cy, c * cx : (c + 1) * cx])
        chunk_a.append(time.perf_counter() - t)
    viewer.close()
    return {
        "first_frame_s": first_cold,
        "first_frame_warm_s": first_warm,
        "first_frame_cpu_s": cpu_cold,
        "first_frame_warm_cpu_s": cpu_warm,
        "rss_mb": (rss1 - rss0) / 2**20,
        "pan_s": pan_s,
        "pan_levels": levels_seen,
        "chunk_dask_s": chunk_d,
        "chunk_array_s": chunk_a,
        "chunk": [cy, cx],
        "levels": [list(a.shape[:2]) for a in pyr_d.arrays],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=100_000, help="slide side in px (default 100000)")
    p.add_argument("--runs", type=int, default=5, help="fresh processes (default 5)")
    p.add_argument("--pans", type=int, default=10, help="pans per run (default 10)")
    p.add_argument("--backend", choices=["dask", "array"], default="dask")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.child is not None:
        res = child(args.child, pans=args.pans, seed=args.seed, backend=args.backend)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    path = slide_path(args.size, args.out)
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        cmd = [sys.executable, __file__, "--child", str(path), "--pans", str(args.pans)]
        cmd += ["--seed", str(i), "--backend", args.backend]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        runs.append(json.loads(line[0][7:]))

    def med(key: str) -> float:
        vals = [v for r in runs for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(vals)

    ff, rss = med("first_frame_s"), med("rss_mb")
    ffw = med("first_frame_warm_s")
    ffc, ffwc = med("first_frame_cpu_s"), med("first_frame_warm_cpu_s")
    pan, cd, ca = med("pan_s") * 1e3, med("chunk_dask_s") * 1e3, med("chunk_array_s") * 1e3
    full_res = sum(lv == 0 for r in runs for lv in r["pan_levels"])
    n_pans = sum(len(r["pan_levels"]) for r in runs)
    cy, cx = runs[0]["chunk"]

    def ok(v: float, key: str) -> str:
        return "yes" if v <= TARGETS[key] else "**no**"

    print(f"\n{path.name}: {args.size} x {args.size} px, levels {runs[0]['levels']}, ")
    print(f"chunks {cy}x{cx}, backend {args.backend}, {args.runs} fresh runs x {args.pans} pans, ")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| measure | median | target | met |")
    print("|---|---|---|---|")
    print(
        f"| open -> first frame, first slide of session | {ff:.2f} s | <= 1.5 s | {ok(ff, 'first_frame_s')} |"
    )
    print(
        f"| open -> first frame, later slide | {ffw:.2f} s | <= 1.5 s | {ok(ffw, 'first_frame_s')} |"
    )
    print(
        f"| CPU time of the above (all threads), first / later | {ffc:.2f} s / {ffwc:.2f} s | - | - |"
    )
    print(f"| extra RSS after first frame | {rss:.0f} MB | <= 300 MB | {ok(rss, 'rss_mb')} |")
    print(f"| unseen level-0 chunk fetch (dask) | {cd:.1f} ms | <= 50 ms | {ok(cd, 'chunk_ms')} |")
    print(f"| unseen level-0 chunk fetch (bare array) | {ca:.1f} ms | - | - |")
    print(f"| pan to unseen spot -> rendered frame | {pan:.0f} ms | - | - |")
    print(f"| pans that rendered level 0 | {full_res}/{n_pans} | all | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
