"""Launch a script as several torchrun-style ranks on this machine (gloo, one thread each)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(
    script: Path, args: Sequence[str], *, world: int = 2, timeout: float = 240
) -> list[tuple[int, str]]:
    """Run ``python script *args`` as ``world`` ranks; each rank's (return code, stderr)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
            # a rank that aborts (SIGABRT, SIGSEGV) prints where, in Python, it was
            "PYTHONFAULTHANDLER": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args], env=env, stderr=subprocess.PIPE, text=True
            )
        )
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errors, strict=True)]


def describe(ranks: Sequence[tuple[int, str]], tail: int = 2000) -> str:
    """Each failed rank's return code (a negative one is the signal) and the end of its log."""
    return "\n".join(
        f"--- rank {r}: exit {rc}\n{err[-tail:]}" for r, (rc, err) in enumerate(ranks) if rc
    )
