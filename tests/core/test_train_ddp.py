"""Data parallelism on CPU (gloo), two processes: DDP keeps identical replicas, FSDP (sharded)
takes the same steps as DDP, and an FSDP checkpoint exports and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _ranks import describe, launch_ranks
from gpfm_core.train.data import sample_indices

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from gpfm_core.train import load_config
from gpfm_core.train.distributed import shutdown_distributed
from gpfm_core.train.loop import batches, build, save, train_step
out, he, strategy, steps, resume = sys.argv[1:6]
# LayerScale 0.1 (not tiny_cpu's 1e-5): with 1e-5 every CLS token is nearly the same, KoLeo's
# nearest-neighbour distances are ~1e-5 and the loss is ill-conditioned, so DDP and FSDP (whose
# reductions round differently) drift apart on some machines. No warm-up: step 0 already
# updates the weights, so "the first losses agree" compares real steps, not lr = 0 ones.
cfg = load_config("tiny_cpu", overrides=[f"data.sources=['{he}']", "data.assume_mpp=0.5",
                                         "optim.batch_size=4", "crops.local_crops_number=1",
                                         "student.kwargs={init_values: 0.1}",
                                         "optim.warmup_steps=0", f"train.strategy={strategy}"])
state = build(cfg, out, resume=resume == "1")
init = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
start = state.step
data = batches(state, state.step * cfg["optim"]["accum_steps"])
terms = [train_step(state, data) for _ in range(int(steps))]
# every logged value per step: each loss term, lr, gradient norm
losses = {k: torch.tensor([t[k] for t in terms], dtype=torch.float64) for k in terms[0]}
save(state)
if state.dist.rank == 0:
    full = torch.load(f"{out}/checkpoint.pt", weights_only=True)["model"]
    torch.save({"start": start, "losses": losses, "after": full},
               f"{out}/result.pt")
if strategy == "ddp":
    torch.save({"init": init, "after": state.model.state_dict()}, f"{out}/rank{state.dist.rank}.pt")
del state, data  # the DDP/FSDP model holds the process group
shutdown_distributed()
"""


def _run(
    script: Path, out: Path, he_png: Path, strategy: str, steps: int, resume: bool
) -> dict | str:
    """Two ranks; their result, or (when they fail) rank 0's last error line, else every
    failed rank's exit code and log."""
    out.mkdir(exist_ok=True)
    args = [str(out), str(he_png), strategy, str(steps), "1" if resume else "0"]
    ranks = launch_ranks(script, args)
    errors = [err for _, err in ranks]
    if any(rc for rc, _ in ranks):
        lines = [ln for ln in errors[0].splitlines() if "Error:" in ln]
        return lines[-1] if lines else describe(ranks)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "dp_steps.py"
    path.write_text(SCRIPT)
    return path


def test_two_cpu_processes_keep_identical_replicas(
    he_png: Path, tmp_path: Path, script: Path
) -> None:
    result = _run(script, tmp_path / "ddp", he_png, "ddp", 2, resume=False)
    assert isinstance(result, dict), result
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


def _same_steps(a: dict, b: dict, steps: slice) -> None:
    """Every logged term (each loss, lr, gradient norm) agrees at the given steps."""
    assert set(a) == set(b) and {"total", "dino", "ibot", "koleo"} <= set(a)
    for k in a:
        assert torch.allclose(a[k], b[k][steps], rtol=1e-4, atol=1e-5), (k, a[k], b[k][steps])


def test_fsdp_takes_the_same_steps_as_ddp_and_resumes(
    he_png: Path, tmp_path: Path, script: Path
) -> None:
    from gpfm_core.encoders import create_encoder
    from gpfm_core.train import load_config
    from gpfm_core.train.checkpoint import load_checkpoint
    from gpfm_core.train.export import export_checkpoint

    # GPFM's clipping (backbone and DINO head each, expert heads never): under FSDP each norm
    # is taken over DTensor shards, under DDP over replicated gradients
    assert load_config("tiny_cpu")["optim"]["clip_grad_mode"] == "per_module"
    ddp = _run(script, tmp_path / "ddp", he_png, "ddp", 3, resume=False)
    fsdp = _run(script, tmp_path / "fsdp", he_png, "fsdp", 2, resume=False)
    assert isinstance(ddp, dict) and isinstance(fsdp, dict), (ddp, fsdp)
    # the premise has force: step 0 already moves the weights (lr > 0), so the second loss
    # is computed by updated weights and its agreement compares a real data-parallel step
    d = ddp["losses"]
    assert float(d["lr"][0]) > 0 and not torch.allclose(d["total"][:1], d["total"][1:2])
    # some module is over optim.clip_grad (3.0): with all three at most 3, the norm is <= 3 sqrt 3
    assert float(d["grad_norm"].min()) > 3.0 * 3**0.5
    # sharded or replicated, the same data-parallel steps: every loss term and the weights
    _same_steps(fsdp["losses"], ddp["losses"], slice(0, 2))
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
    _same_steps(resumed["losses"], ddp["losses"], slice(2, 3))
    for k, v in ddp["after"].items():
        got = resumed["after"][k]
        if k.endswith("attn.qkv.bias"):
            # the key bias has no gradient in exact arithmetic (softmax ignores a shift shared
            # by every key), only rounding noise, which AdamW normalises into steps of ~lr:
            # the two reduction orders may move it differently, so it is not compared
            d = v.shape[0] // 3
            v, got = torch.cat([v[:d], v[2 * d :]]), torch.cat([got[:d], got[2 * d :]])
        assert torch.allclose(got, v, rtol=1e-4, atol=1e-5), k
    # a DDP checkpoint holds its optimiser by parameter ids: FSDP says so instead of guessing
    err = _run(script, tmp_path / "ddp", he_png, "fsdp", 1, resume=True)
    assert isinstance(err, str) and "ConfigError" in err and "resume it with strategy ddp" in err
