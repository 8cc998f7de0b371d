"""Benchmark tissue detection: on the CMU sample, and its per-pixel work at slide scale.

Usage::

    GPFM_DATA_DIR=../shared/data PYTHONPATH=src python benchmarks/bench_tissue.py \\
        [--sides 3125 8192 12500] [--repeats 5]

Times, as the median of ``--repeats`` runs:

* ``detect_tissue`` on ``cmu_small_region.svs`` (read at 8 µm/px, 185 x 138 mask);
* the detector's work without the read (colour table, ink, morphology, size filters) on
  square RGB images of each side in ``--sides``, made by tiling the CMU sample read at
  8 µm/px, so they hold tissue, glass and marking dye in the sample's proportions. 3125 px
  is the mask of the 100,000² px slide at 0.25 µm/px; 8192 px the largest mask
  ``detect_tissue`` reads; 12,500 px a 100,000² px slide at 1 µm/px without that cap.

The whole-slide target (tissue + grid on the 100,000² slide < 3 s) is measured by
``bench_slides.py``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_slides import print_report
from gpfm_core.slide import open_slide
from gpfm_core.tissue import _segment, detect_tissue

#: detect_tissue's defaults, for the work on arrays
OPTIONS = {
    k: p.default
    for k, p in inspect.signature(detect_tissue).parameters.items()
    if p.kind is p.KEYWORD_ONLY and k != "mask_mpp"
}


def _sample() -> Path:
    path = Path(os.environ.get("GPFM_DATA_DIR", "../shared/data")) / "cmu_small_region.svs"
    if not path.is_file():
        sys.exit(f"{path} missing: set GPFM_DATA_DIR to the sample-data folder")
    return path


def _times(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[3125, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    path = _sample()
    rows: list[tuple[str, str, str]] = []

    def on_sample() -> None:
        with open_slide(path) as s:
            detect_tissue(s)

    on_sample()  # imports and caches out of the timing
    wall, cpu = _times(on_sample, args.repeats)
    rows.append(("detect_tissue, CMU sample (185 x 138 mask)", f"{wall:.3f} s", f"CPU {cpu:.3f} s"))
    with open_slide(path) as s:
        thumb = s.read_scaled((138, 185))
    for side in args.sides:
        reps = (side // thumb.shape[0] + 1, side // thumb.shape[1] + 1, 1)
        rgb = np.ascontiguousarray(np.tile(thumb, reps)[:side, :side])
        tissue, ink, _ = _segment(rgb, 8.0, **OPTIONS)
        wall, cpu = _times(lambda rgb=rgb: _segment(rgb, 8.0, **OPTIONS), args.repeats)
        rows.append(
            (
                f"detector work on a {side}² image (8 µm/px)",
                f"{wall:.2f} s",
                f"CPU {cpu:.2f} s, {side * side / 1e6 / wall:.0f} Mpx/s, tissue "
                f"{tissue.mean():.1%}, ink {ink.mean():.2%}, peak RSS so far "
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
            )
        )
        del rgb, tissue, ink

    print_report(rows, argv, f"median of {args.repeats} runs", "time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
