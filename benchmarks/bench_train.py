"""Training throughput of the tiny CPU config: steps/s, tiles/s and peak RSS, median of runs.

Run:  GPFM_DATA_DIR=../shared/data PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py
Options: --config (tiny_cpu), --steps (20 timed steps after 3 warm-up), --runs (5),
--threads (torch threads, 2), --set key=value (config overrides). Each run is a fresh
subprocess so its peak RSS is its own. Prints a markdown table (median, min, max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from gpfm_core.train import load_config
from gpfm_core.train.loop import batches, build, train_step
cfg = load_config(sys.argv[1], overrides=json.loads(sys.argv[5]))
state = build(cfg, sys.argv[2])
data = batches(state, 0)
for _ in range(3):
    train_step(state, data)
n = int(sys.argv[4])
t0 = time.perf_counter()
for _ in range(n):
    train_step(state, data)
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
print(json.dumps({"steps_per_s": n / dt, "tiles_per_s": n * state.global_batch / dt, "peak_rss_mib": rss,
                  "params_m": sum(p.numel() for p in state.model.student.parameters()) / 1e6}))
"""


def run_once(config: str, steps: int, threads: int, overrides: list[str]) -> dict[str, float]:
    """One fresh-process measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                config,
                tmp,
                str(threads),
                str(steps),
                json.dumps(overrides),
            ],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")},
            check=False,
        )
    if res.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="tiny_cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    results = [
        run_once(args.config, args.steps, args.threads, args.overrides) for _ in range(args.runs)
    ]
    print(
        f"config {args.config}, {results[0]['params_m']:.2f} M student params, {args.steps} steps x {args.runs} runs, {args.threads} threads\n"
    )
    print("| metric | median | min | max |\n|---|---|---|---|")
    for key in ("steps_per_s", "tiles_per_s", "peak_rss_mib"):
        vals = [r[key] for r in results]
        print(f"| {key} | {statistics.median(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
