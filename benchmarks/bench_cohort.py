"""Cohort embedding: inline against ``--cluster local`` on the same slides, side by side.

Run:  GPFM_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_cohort.py
      (--small: 8 slides and a 1,000-entry plan, for a quick check)
Options: --slides (40), --workers (the --cluster local default), --mpp (tiling µm/px,
0.5), --plan-n (10000), --runs (3: inline and cluster side by side each time; every figure
is the median over runs), --cache DIR (generated slides are kept there between runs).

A cohort of generated slides of mixed sizes (``make_synthetic_slide``, 0.25 µm/px, 1 to
8 MP) is embedded with ``tiny-vit`` twice into fresh folders: inline (one slide after
another in this process) and through ``--cluster local`` (``run_cohort(executor="local")``,
a LocalCluster of worker processes). Prints a markdown table:

- tiles/s of each, over the embedding phase (first slide started -> last slide's report
  back in the caller) and end to end (the call, including building the encoder, starting
  the cluster and its workers, and closing it), and the cluster / inline ratio (target
  >= 0.9 over the embedding phase);
- the cluster's one-off costs: start (call -> first slide started: the LocalCluster, and
  every worker importing torch and building the encoder) and close (last report -> the call
  returned: mostly the worker processes exiting, ~0.6 s for any process that imported torch
  on this machine);
- the per-slide scheduling overhead of the cluster run: the median gap between two slides
  on one worker (one slide's end -> the next one's start), the share of worker time not
  spent in slides over the embedding phase, and a no-op task's round trip through a
  LocalCluster (submit -> result);
- planning a cohort of ``--plan-n`` entries (manifest read + plan, with a cohort table of
  that many current rows): target < 5 s.
The 1-min load average is printed at the start and the end (the machine may be shared).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpfm_core.cohort import EmbedSettings, read_cohort_inputs, run_cohort  # noqa: E402
from gpfm_core.cohort.run import plan_cohort  # noqa: E402
from gpfm_core.cohort.table import TableRow, update_table  # noqa: E402

# (width, height) level-0 px at 0.25 µm/px: 1 to 8 MP, mixed
SIZES = [(1024, 1024), (2048, 1024), (2048, 2048), (3072, 2048), (4096, 2048), (1536, 1024)]


def _slides(folder: Path, n: int, small: bool) -> list[Path]:
    from gpfm_core.synth import make_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        if small:
            w, h = w // 2, h // 2
        p = folder / f"slide{i:03d}_{w}x{h}.svs"
        if not p.exists():
            make_synthetic_slide(p, width=w, height=h, mpp=0.25, tile=256, seed=i)
        out.append(p)
    return out


def _embed(entries, out: Path, settings: EmbedSettings, executor: str):
    """(run, wall s, embedding phase s, tiles, start s, close s) of one run into ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    back: list[float] = []  # when each slide's report reached this process
    t0 = time.time()
    run = run_cohort(
        entries, out_dir=out, settings=settings, executor=executor,
        on_result=lambda _: back.append(time.time()),
    )  # fmt: skip
    t1 = time.time()
    bad = [r for r in run.reports if r.status != "embedded"]
    if bad:
        raise SystemExit(f"{executor}: {len(bad)} slides not embedded: {bad[0].error}")
    first = min(r.started for r in run.reports)
    tiles = sum(r.n_tiles for r in run.reports)
    return run, t1 - t0, max(back) - first, tiles, first - t0, t1 - max(back)


def _gaps_ms(run) -> list[float]:
    """Each worker's idle time between two of its slides (end -> next start), ms."""
    by_worker: dict[str, list] = {}
    for r in run.reports:
        by_worker.setdefault(r.worker, []).append(r)
    gaps = []
    for reports in by_worker.values():
        reports.sort(key=lambda r: r.started)
        gaps += [1000 * (b.started - a.started - a.seconds) for a, b in itertools.pairwise(reports)]
    return gaps


def _noop() -> int:
    return 0


def _noop_round_trip_ms(n_workers: int, n: int = 200) -> float:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.submit(_noop, pure=False).result()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.submit(_noop, pure=False).result()
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _plan_bench(tmp: Path, n: int, settings: EmbedSettings) -> tuple[float, float]:
    """Seconds to read an n-row manifest and plan it: (no table yet, every row current)."""
    from gpfm_core.encoders import create_encoder

    enc = create_encoder(settings.encoder)
    folder = tmp / "plan"
    slides = folder / "slides"
    slides.mkdir(parents=True)
    lines = ["path,slide_id"]
    for i in range(n):
        (slides / f"s{i}.svs").write_bytes(b"x")
        lines.append(f"slides/s{i}.svs,case-{i}")
    manifest = folder / "cohort.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = folder / "out"

    def plan():
        t = time.perf_counter()
        entries = read_cohort_inputs([manifest])
        p = plan_cohort(
            entries, out, meta=enc.meta, weights_hash=enc.weights_hash, settings=settings
        )
        return time.perf_counter() - t, entries, p

    cold, entries, p = plan()
    key = p.settings[entries[0].path]
    rows = []
    feats = out / "f"
    feats.mkdir(parents=True)
    for e in entries:
        f = feats / f"{e.path.stem}.h5"
        f.write_bytes(b"y")
        st, fst = e.path.stat(), f.stat()
        rows.append(
            TableRow(
                slide_id=e.slide_id, file=f"f/{f.name}", slide_path=str(e.path),
                content_id="0" * 16, encoder=enc.meta.name, weights_hash=enc.weights_hash,
                tiling="t", mpp=1.0, tile_px=112, overlap_px=0, n_tiles=100, embed_dim=64,
                dtype="float32", sha256="0" * 64, settings=key, slide_size=st.st_size,
                slide_mtime_ns=st.st_mtime_ns, file_size=fst.st_size,
                file_mtime_ns=fst.st_mtime_ns, created="",
            )
        )  # fmt: skip
    update_table(out, rows)
    warm, _, p = plan()
    assert not p.todo and len(p.settled) == n, "every row should be current"
    return cold, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="8 slides, 1,000-entry plan")
    ap.add_argument("--slides", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--plan-n", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3, help="inline + cluster pairs (median)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_cohort")
    args = ap.parse_args()
    if not os.environ.get("GPFM_DATA_DIR"):
        os.environ["GPFM_DATA_DIR"] = str(ROOT.parent / "shared" / "data")
    n_slides = args.slides or (8 if args.small else 40)
    plan_n = args.plan_n or (1000 if args.small else 10_000)
    from gpfm_core.cohort.distributed import default_local_workers

    n_workers = args.workers or default_local_workers("cpu")
    executor = f"local:{n_workers}"
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    slides = _slides(args.cache / ("small" if args.small else "full"), n_slides, args.small)
    entries = read_cohort_inputs(slides)
    settings = EmbedSettings(encoder="tiny-vit", mpp=args.mpp, device="cpu", batch_size=64)
    rows: list[tuple[str, str, str]] = []
    med = statistics.median
    figures: dict[str, list[float]] = {}

    def keep(**values: float) -> None:
        for k, v in values.items():
            figures.setdefault(k, []).append(v)

    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmpdir:
        tmp = Path(tmpdir)
        for _ in range(args.runs):  # inline and cluster side by side in each run
            _, wall_i, phase_i, tiles, _, _ = _embed(entries, tmp / "inline", settings, "inline")
            run_c, wall_c, phase_c, tiles_c, start_c, close_c = _embed(
                entries, tmp / "cluster", settings, executor
            )
            assert tiles_c == tiles, (tiles, tiles_c)
            busy = sum(r.seconds for r in run_c.reports)
            keep(
                wall_i=wall_i, phase_i=phase_i, wall_c=wall_c, phase_c=phase_c, start_c=start_c,
                close_c=close_c, ratio=phase_i / phase_c, ratio_end=wall_i / wall_c,
                idle=max(0.0, 1 - busy / (phase_c * n_workers)), gap_ms=med(_gaps_ms(run_c)),
                queue_ms=1000 * med(r.queue_s for r in run_c.reports),
            )  # fmt: skip
        noop_ms = _noop_round_trip_ms(n_workers)
        cold, warm = _plan_bench(tmp, plan_n, settings)
    f = {k: med(v) for k, v in figures.items()}
    wall_i, phase_i, wall_c, phase_c = f["wall_i"], f["phase_i"], f["wall_c"], f["phase_c"]
    start_c, close_c, ratio, idle = f["start_c"], f["close_c"], f["ratio"], f["idle"]
    gap_ms, queue_ms = f["gap_ms"], f["queue_ms"]
    print(f"median of {args.runs} runs; cluster / inline per run: "
          + ", ".join(f"{r:.2f}x" for r in figures["ratio"]))  # fmt: skip
    rows += [
        ("slides / tiles", f"{n_slides} / {tiles}", ""),
        ("inline tiles/s (embedding phase; end to end)",
         f"{tiles / phase_i:.1f}; {tiles / wall_i:.1f}", ""),
        (f"--cluster {executor} tiles/s (embedding phase; end to end)",
         f"{tiles / phase_c:.1f}; {tiles / wall_c:.1f}", ""),
        ("cluster / inline, embedding phase", f"{ratio:.2f}x", ">= 0.9x"),
        ("cluster / inline, end to end", f"{f['ratio_end']:.2f}x", "(report)"),
        ("cluster start (LocalCluster, workers import torch, build the encoder)",
         f"{start_c:.2f} s", "(report)"),
        ("cluster close (last report -> returned; worker processes exit)", f"{close_c:.2f} s",
         "(report)"),
        ("per-slide scheduling overhead: median gap between two slides on a worker",
         f"{gap_ms:.1f} ms", "(report)"),
        ("worker time outside slides, embedding phase", f"{100 * idle:.0f} %", "(report)"),
        ("median wait in the queue (all slides submitted at once)", f"{queue_ms:.0f} ms", "(report)"),
        ("no-op task round trip through a LocalCluster", f"{noop_ms:.1f} ms", "(report)"),
        (f"plan {plan_n:,} entries, no cohort table yet", f"{cold:.2f} s", "< 5 s"),
        (f"plan {plan_n:,} entries, all current (a rerun)", f"{warm:.2f} s", "< 5 s"),
    ]  # fmt: skip
    print()
    print("| measure | value | target |")
    print("| --- | --- | --- |")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")
    print()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
