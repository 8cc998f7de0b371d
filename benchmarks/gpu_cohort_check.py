"""GPU check of cohort embedding on dask.distributed (issue 11): ``gpfm embed cohort.csv`` run
inline, with ``--cluster local:1`` and with ``--cluster local:2`` on one GPU, side by side.

Run on a CUDA machine (``benchmarks/gpu_check.sh`` runs it as its ``cohort`` part):
    GPFM_DATA_DIR=../shared/data PYTHONPATH=src python benchmarks/gpu_cohort_check.py

The cohort: the four 30,000 x 30,000 px slides that ``gpu_check.py`` generates for its
end-to-end run (reused when present, else generated) and eight smaller ones of mixed sizes
(6,000 to 12,000 px), all 0.25 µm/px, listed in a manifest ``cohort.csv``. The encoder: a
GPFM-shaped ViT-L/14 with random weights, written once as a self-describing safetensors file
(``save_encoder_safetensors``) that every run and every dask worker loads by path, with
GPFM's tiling (512 px at 0.25 µm/px -> 224 px), bf16, tissue detection on.

Each run is the CLI, a subprocess, into a fresh output folder:
``python -m gpfm_core embed cohort.csv --out OUT --encoder CKPT --device cuda
--batch-size 256 --workers 8 --quiet --report CSV [--cluster local:N]``. What one GPU can say:

* ``local:1`` is the unit of a multi-GPU box (one GPU worker per GPU, what ``--cluster local``
  starts here): against inline it measures what the dask path costs (target >= 0.9 x);
* ``local:2`` is the issue's 2-worker run: two worker processes share the GPU (each with its
  own CUDA context, model copy and 8 reader threads), so one worker's CPU-only stages (open,
  tissue detection, writing) overlap the other's GPU work; reported, no target (it has twice
  the reader threads of the other runs).

Tiles/s are taken over the embedding phase (first slide started -> last slide finished: each
slide's finish is the moment the CLI prints its line, its start that minus the slide's seconds
in the run report) and over the CLI's whole wall time (Python start, imports, cluster start,
encoder load included). Idle ms / slide: worker time not spent in slides during the phase,
``(phase x workers - sum of slide seconds) / slides``. Every run must embed every slide with
the same tile count.

``--budget-s`` (``gpu_check.sh`` passes the part's budget): the slides still being generated
when only 60 % of the budget is left are left out of the cohort; the runs go in the order
inline, ``local:2`` (the issue's), ``local:1``, and one that would not fit (1.25 x the slowest
run so far) is listed as not run; a run still going at the budget is interrupted. The table is
written in every case; the exit status is 0 only when every run ran and ``local:1`` met its
target.

``--tiny`` runs the same script on CPU with ``tiny-vit`` (also as a checkpoint file) and four
small slides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpu_check import Budget, SlideJobs, big_slide_path, sample_dir  # noqa: E402

#: Share of the budget left after the encoder is written that the runs get at least.
RUNS_SHARE = 0.6
#: (width, height) level-0 px at 0.25 µm/px of the smaller slides, cycled.
SMALL = [(12000, 9000), (9000, 9000), (8000, 6000), (6000, 6000)]


def cohort_jobs(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """The cohort's slides as ``(path, width, height, seed)``: gpu_check.py's, then smaller ones."""
    jobs = [
        (str(big_slide_path(args.big_dir, args.big_px, i)), args.big_px, args.big_px, i)
        for i in range(args.big)
    ]
    for i in range(args.small):
        w, h = (max(512, int(v * args.small_scale)) for v in SMALL[i % len(SMALL)])
        jobs.append((str(args.work / "slides" / f"slide{i:02d}_{w}x{h}.svs"), w, h, 100 + i))
    (args.work / "slides").mkdir(parents=True, exist_ok=True)
    return jobs


def encoder_spec(args: argparse.Namespace) -> str:
    """The path of a random-weight GPFM-shaped checkpoint (``tiny-vit`` with --tiny)."""
    name = "tiny-vit" if args.tiny else "gpfm"
    path = args.work / f"{name}-random.safetensors"
    if not path.is_file():
        from gpfm_core.encoders import create_encoder, save_encoder_safetensors

        save_encoder_safetensors(create_encoder(name, pretrained=False), path)
    return str(path)


class RunFailed(RuntimeError):
    """One ``gpfm embed`` run failed or was stopped; the message says how."""


def run_cli(
    mode: str, manifest: Path, args: argparse.Namespace, encoder: str, *, limit_s: float
) -> dict[str, Any]:
    """One ``gpfm embed`` run; its wall time, embedding phase, tiles and idle time per slide.

    A run still going after ``limit_s`` seconds is interrupted (SIGINT: the CLI closes its
    cluster), then killed 15 s later. Raises :class:`RunFailed`.
    """
    from gpfm_core.cohort.run import read_report

    tag = mode.replace(":", "")
    out, report = args.work / f"out_{tag}", args.work / f"report_{tag}.csv"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "gpfm_core", "embed", str(manifest), "--out", str(out),
        "--encoder", encoder, "--device", args.device, "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--quiet", "--report", str(report),
    ]  # fmt: skip
    if mode != "inline":
        cmd += ["--cluster", mode]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    print("$ gpfm " + " ".join(cmd[3:]), flush=True)
    finished: dict[str, float] = {}
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT) as proc:
        stops = [
            threading.Timer(max(1.0, limit_s), proc.send_signal, (signal.SIGINT,)),
            threading.Timer(max(1.0, limit_s) + 15, proc.kill),
        ]
        for timer in stops:
            timer.daemon = True
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            slide, sep, _ = line.partition(" -> ")
            if sep:
                finished[slide] = now
            else:
                print("  " + line.rstrip(), flush=True)
    for timer in stops:
        timer.cancel()
    wall = time.perf_counter() - t0
    if wall >= limit_s and proc.returncode != 0:
        raise RunFailed(f"stopped at the budget after {wall:.0f} s")
    if proc.returncode != 0:
        raise RunFailed(f"gpfm embed exited {proc.returncode}")
    rows = read_report(report)
    bad = [r for r in rows if r["status"] != "embedded"]
    if bad:
        raise RunFailed(f"{bad[0]['slide_id']} {bad[0]['status']}")
    seconds = {r["slide_path"]: float(r["seconds"]) for r in rows}
    if set(seconds) - set(finished):
        raise RunFailed("no output line for some slides")
    start = min(finished[p] - s for p, s in seconds.items())
    phase = max(finished.values()) - start
    n_workers = 1 if mode == "inline" else int(mode.partition(":")[2] or 1)
    return {
        "mode": mode,
        "wall": wall,
        "phase": phase,
        "tiles": sum(int(r["n_tiles"]) for r in rows),
        "idle_ms": 1000 * max(0.0, phase * n_workers - sum(seconds.values())) / len(rows),
        "slides": len(rows),
        "workers": len({r["worker"] for r in rows}),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the cohort three ways; exit status 0 when all ran and local:1 keeps >= 0.9 x inline."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny-vit, small slides")
    p.add_argument("--runs", default="inline,local:2,local:1", help="runs, comma-separated")
    p.add_argument("--data", type=Path, default=None, help="sample images")
    p.add_argument("--big", type=int, default=4, help="30,000 px slides (gpu_check.py's)")
    p.add_argument("--big-px", type=int, default=30_000)
    p.add_argument("--big-dir", type=Path, default=ROOT / "bench_out" / "gpu_check")
    p.add_argument("--small", type=int, default=8, help="smaller slides of mixed sizes")
    p.add_argument("--small-scale", type=float, default=1.0, help="scale of the smaller slides")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8, help="reader threads per slide")
    p.add_argument("--work", type=Path, default=ROOT / "bench_out" / "gpu_cohort")
    p.add_argument("--md", type=Path, default=None, help="append the table to this file")
    p.add_argument("--budget-s", type=float, default=None, help="stop cleanly within this time")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)
    if args.tiny:
        args.big, args.small = 0, min(args.small, 4)
        args.small_scale = min(args.small_scale, 0.2)
        args.batch_size, args.workers = min(args.batch_size, 64), min(args.workers, 2)
    from gpu_check import sample_sources

    data = sample_dir(args.data)
    os.environ.setdefault("GPFM_DATA_DIR", str(data))
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        print("gpu_cohort_check: no CUDA device; --tiny runs it on CPU", file=sys.stderr)
        return 2
    args.device = "cuda" if cuda else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = cohort_jobs(args)
    making = SlideJobs(jobs, [str(s) for s in sample_sources(data)])
    encoder = encoder_spec(args)  # while the slides are generated
    print(f"encoder {encoder} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    # the runs get at least RUNS_SHARE of what is left; the slides not ready by then are left out
    slides = making.finish(timeout=budget.left() * (1 - RUNS_SHARE))
    print(
        f"cohort: {len(slides)} of {len(jobs)} slides ready ({making.n_generated} generated) "
        f"after {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    if not slides:
        print("gpu_cohort_check: no slide ready within the budget", file=sys.stderr)
        return 1
    manifest = args.work / "cohort.csv"
    from gpfm_core._atomic import write_atomic

    write_atomic(manifest, "path,slide_id\n" + "".join(f"{s},{s.stem}\n" for s in slides))
    results: list[dict[str, Any]] = []
    for mode in (m.strip() for m in args.runs.split(",")):
        # a run takes about as long as the slowest so far (the first one always runs)
        walls = [r["wall"] for r in results if "wall" in r]
        if walls and not budget.allows(1.25 * max(walls)):
            why = f"not run: {max(0.0, budget.left()):.0f} s of the budget left"
            print(f"{mode}: {why}", flush=True)
            results.append({"mode": mode, "error": why})
            continue
        try:
            results.append(run_cli(mode, manifest, args, encoder, limit_s=budget.left()))
        except RunFailed as exc:
            print(f"{mode}: {exc}", flush=True)
            results.append({"mode": mode, "error": str(exc)})
    done = [r for r in results if "error" not in r]
    tiles = {r["tiles"] for r in done}
    if len(tiles) > 1:
        print(
            f"gpu_cohort_check: runs disagree on the tile count: {sorted(tiles)}", file=sys.stderr
        )
    inline = next((r for r in done if r["mode"] == "inline"), None)
    gpu = torch.cuda.get_device_name(0) if cuda else "CPU dry run"
    lines = [
        f"\nCohort embedding, {len(slides)} slides, {max(tiles, default=0):,} tiles ({gpu}, "
        f"--workers {args.workers} reader threads per slide, batch {args.batch_size})\n",
        "| gpfm embed cohort.csv | embedding phase s | tiles/s (phase) | CLI wall s | "
        "tiles/s (wall) | vs inline (phase) | idle ms / slide | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ok = len(done) == len(results) and len(tiles) == 1
    for r in results:
        name = "(inline)" if r["mode"] == "inline" else f"--cluster {r['mode']}"
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | |")
            continue
        rate = r["tiles"] / r["phase"]
        ratio = rate / (inline["tiles"] / inline["phase"]) if inline else float("nan")
        target = ""
        if r["mode"] == "local:1":
            target = ">= 0.9x" + ("" if args.tiny else (" PASS" if ratio >= 0.9 else " FAIL"))
            ok = ok and (args.tiny or ratio >= 0.9)
        lines.append(
            f"| {name} | {r['phase']:.1f} | {rate:,.0f} | {r['wall']:.1f} | "
            f"{r['tiles'] / r['wall']:,.0f} | {ratio:.2f}x | {r['idle_ms']:.0f} | {target} |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    if args.md is not None:
        from gpu_check import append_md

        append_md(args.md, text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
