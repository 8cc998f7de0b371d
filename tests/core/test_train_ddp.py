"""DDP on CPU (gloo): two processes, two steps, identical replicas afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from gpfm_core.train.data import sample_indices

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from gpfm_core.train import load_config
from gpfm_core.train.distributed import shutdown_distributed
from gpfm_core.train.loop import batches, build, train_step
out, he = sys.argv[1], sys.argv[2]
cfg = load_config("tiny_cpu", overrides=[f"data.sources=['{he}']", "data.assume_mpp=0.5",
                                         "optim.batch_size=4", "crops.local_crops_number=1"])
state = build(cfg, out)
init = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
data = batches(state, 0)
losses = [train_step(state, data)["total"] for _ in range(2)]
torch.save({"init": init, "after": state.model.state_dict(), "losses": torch.tensor(losses)},
           f"{out}/rank{state.dist.rank}.pt")
shutdown_distributed()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_keep_identical_replicas(he_png: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_steps.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path), str(he_png)],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # same initial weights, different data per rank, different local losses ...
    assert all(torch.equal(r0["init"][k], r1["init"][k]) for k in r0["init"])
    a = sample_indices(48, seed=0, step=0, batch_size=4, rank=0, world_size=2)
    b = sample_indices(48, seed=0, step=0, batch_size=4, rank=1, world_size=2)
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert not torch.allclose(r0["losses"], r1["losses"])
    # ... yet after two all-reduced steps the replicas (student, EMA teacher, centres) agree
    changed = 0
    for k, v in r0["after"].items():
        assert torch.allclose(v, r1["after"][k], atol=1e-6), k
        changed += int(not torch.equal(v, r0["init"][k]))
    assert changed > 10
