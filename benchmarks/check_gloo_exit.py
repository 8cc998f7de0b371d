"""How often a finished two-rank gloo run aborts at exit, by how it leaves the process group.

Run:  .venv/bin/python benchmarks/check_gloo_exit.py [--runs 40]

Each run starts two CPU ranks (gloo) that train two small DDP models for three steps, gather
one object, and then leave the group in one of four ways:

- ``neither``: ``destroy_process_group()`` with the DDP models alive (what the CI test and
  ``gpfm train`` did before 2026-11-30);
- ``barrier``: :func:`gpfm_core.train.distributed.shutdown_distributed` (a barrier, a
  garbage collection, then the group destroyed) with the models alive;
- ``drop``: the models dropped, then ``destroy_process_group()``;
- ``both``: the models dropped, then ``shutdown_distributed()`` (what ``gpfm train`` does).

Prints a markdown table: runs in which some rank exited non-zero ("terminate called
without an active exception", exit -6). The abort is a race: its rate depends on the
machine and its load, so this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from gpfm_core.train.distributed import shutdown_distributed
torch.set_num_threads(1)
dist.init_process_group("gloo")
models = []
for _ in range(2):
    m = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        m(torch.randn(16, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
    models.append(m)
gathered = [None, None]
dist.all_gather_object(gathered, [1.0])
mode = sys.argv[1]
if mode in ("drop", "both"):
    del models, m, opt
if mode in ("barrier", "both"):
    shutdown_distributed()
else:
    dist.destroy_process_group()
"""

MODES = ("neither", "barrier", "drop", "both")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, mode: str) -> list[int]:
    """Both ranks' exit codes."""
    port = _port()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), mode],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in range(2)
    ]
    return [p.wait(timeout=120) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="runs per way of leaving")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "leave.py"
        script.write_text(SCRIPT)
        for mode in MODES:
            aborted = sum(any(_run(script, mode)) for _ in range(args.runs))
            rows.append((mode, aborted))
            print(f"{mode}: {aborted} of {args.runs} runs aborted", flush=True)
    print()
    print("| leaving the group | runs with a rank aborted |")
    print("| --- | --- |")
    for mode, aborted in rows:
        print(f"| {mode} | {aborted} of {args.runs} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
