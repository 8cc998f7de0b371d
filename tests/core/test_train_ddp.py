"""Data parallelism on CPU (gloo), two processes: DDP keeps identical replicas, FSDP (sharded)
takes the same steps as DDP, and an FSDP checkpoint exports and resumes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpfm_core.train.data import sample_indices

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from gpfm_core.train import load_config
from gpfm_core.train.distributed import shutdown_distributed
from gpfm_core.train.loop import batches, build, save, train_step
out, he, strategy, steps, resume = sys.argv[1:6]
cfg = load_config("tiny_cpu", overrides=[f"data.sources=['{he}']", "data.assume_mpp=0.5",
                                         "optim.batch_size=4", "crops.local_crops_number=1",
                                         f"train.strategy={strategy}"])
state = build(cfg, out, resume=resume == "1")
init = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
start = state.step
data = batches(state, state.step * cfg["optim"]["accum_steps"])
losses = [train_step(state, data)["total"] for _ in range(int(steps))]
save(state)
if state.dist.rank == 0:
    full = torch.load(f"{out}/checkpoint.pt", weights_only=True)["model"]
    torch.save({"start": start, "losses": torch.tensor(losses), "after": full},
               f"{out}/result.pt")
if strategy == "ddp":
    torch.save({"init": init, "after": state.model.state_dict()}, f"{out}/rank{state.dist.rank}.pt")
shutdown_distributed()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    script: Path, out: Path, he_png: Path, strategy: str, steps: int, resume: bool
) -> dict | str:
    """Two ranks; their result, or (when they fail) rank 0's last error line."""
    out.mkdir(exist_ok=True)
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
        args = [str(out), str(he_png), strategy, str(steps), "1" if resume else "0"]
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args], env=env, stderr=subprocess.PIPE, text=True
            )
        )
    errors = [p.communicate(timeout=240)[1] for p in procs]
    if any(p.returncode for p in procs):
        lines = [ln for ln in errors[0].splitlines() if "Error:" in ln]
        return lines[-1] if lines else errors[0][-2000:]
    return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "dp_steps.py"
    path.write_text(SCRIPT)
    return path


def test_two_cpu_processes_keep_identical_replicas(
    he_png: Path, tmp_path: Path, script: Path
) -> None:
    _run(script, tmp_path / "ddp", he_png, "ddp", 2, resume=False)
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    # same initial weights, different data per rank ...
    assert all(torch.equal(r0["init"][k], r1["init"][k]) for k in r0["init"])
    a = sample_indices(48, seed=0, step=0, batch_size=4, rank=0, world_size=2)
    b = sample_indices(48, seed=0, step=0, batch_size=4, rank=1, world_size=2)
    assert set(a.tolist()).isdisjoint(b.tolist())
    # ... yet after two all-reduced steps the replicas (student, EMA teacher, centres) agree
    changed = 0
    for k, v in r0["after"].items():
        assert torch.allclose(v, r1["after"][k], atol=1e-6), k
        changed += int(not torch.equal(v, r0["init"][k]))
    assert changed > 10


def test_fsdp_takes_the_same_steps_as_ddp_and_resumes(
    he_png: Path, tmp_path: Path, script: Path
) -> None:
    from gpfm_core.encoders import create_encoder
    from gpfm_core.train.checkpoint import load_checkpoint
    from gpfm_core.train.export import export_checkpoint

    ddp = _run(script, tmp_path / "ddp", he_png, "ddp", 3, resume=False)
    fsdp = _run(script, tmp_path / "fsdp", he_png, "fsdp", 2, resume=False)
    # sharded or replicated, the same data-parallel steps: losses and the gathered weights
    assert torch.allclose(fsdp["losses"], ddp["losses"][:2], rtol=1e-4, atol=1e-5)
    ckpt = load_checkpoint(tmp_path / "fsdp" / "checkpoint.pt")
    assert ckpt["optimizer_format"] == "names" and ckpt["step"] == 2
    assert set(ckpt["model"]) == set(ddp["after"])
    # the full checkpoint written by FSDP exports to an encoder like any other
    enc = create_encoder(
        export_checkpoint(tmp_path / "fsdp" / "checkpoint.pt", tmp_path / "e.safetensors")
    )
    assert enc.meta.embed_dim == 64
    # resuming the sharded run (model + sharded AdamW state) continues the DDP trajectory
    resumed = _run(script, tmp_path / "fsdp", he_png, "fsdp", 1, resume=True)
    assert resumed["start"] == 2
    assert torch.allclose(resumed["losses"], ddp["losses"][2:], rtol=1e-4, atol=1e-5)
    for k, v in ddp["after"].items():
        assert torch.allclose(resumed["after"][k], v, rtol=1e-4, atol=1e-5), k
    # a DDP checkpoint holds its optimiser by parameter ids: FSDP says so instead of guessing
    err = _run(script, tmp_path / "ddp", he_png, "fsdp", 1, resume=True)
    assert isinstance(err, str) and "ConfigError" in err and "resume it with strategy ddp" in err
