"""Two CPU processes (gloo) on one tile index: it is compiled once, the logged loss terms are
the mean of both ranks' own terms, and snapshots and evaluation work replicated (DDP) and
sharded (FSDP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _ranks import describe, launch_ranks
from gpfm_core.cli import main
from gpfm_core.train.checkpoint import load_checkpoint
from gpfm_core.train.logging_csv import read_metrics
from gpfm_core.train.snapshots import load_training_weights

SCRIPT = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
torch.set_num_threads(1)
import torch.distributed as dist
from gpfm_core.train import load_config, train
from gpfm_core.train.distributed import shutdown_distributed
from gpfm_core.train.loop import batches, build, train_step
out, lists, strategy = sys.argv[1:4]
cfg = load_config("tiny_cpu", overrides=[
    f"data.tile_lists=['{lists}']", f"data.index={out}/shared.tileindex", "optim.batch_size=4",
    "crops.local_crops_number=1", "student.kwargs={init_values: 0.1}", "optim.warmup_steps=0",
    f"train.strategy={strategy}", "optim.total_steps=2", "train.snapshot_every=2",
    "eval.every=2", "eval.n_per_class=8"])
state = train(cfg, f"{out}/run")
# the same two steps again, by hand: each rank's own (not averaged) loss terms
again = build(cfg, f"{out}/manual")
data = batches(again, 0)
local = [train_step(again, data) for _ in range(2)]
data.close()
every = [None, None]
dist.all_gather_object(every, local)
if again.dist.is_main:
    with open(f"{out}/local.json", "w") as fh:
        json.dump(every, fh)
del state, again, data  # the DDP/FSDP models hold the process group
shutdown_distributed()
"""

LOSSES = ("dino", "koleo", "ibot", "expert_tiny_expert_cls", "expert_tiny_expert_patch", "total")


def _launch(script: Path, out: Path, lists: Path, strategy: str) -> list[str]:
    """Two ranks; their stderr (the log)."""
    out.mkdir()
    ranks = launch_ranks(script, [str(out), str(lists), strategy], timeout=400)
    assert all(rc == 0 for rc, _ in ranks), describe(ranks)
    return [err for _, err in ranks]


@pytest.fixture(scope="module")
def tile_list(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    out = tmp_path_factory.mktemp("store")
    assert main(["tiles", str(cmu_svs), "--mpp", "1.0", "--tile-px", "64", "--out", str(out)]) == 0
    (folder,) = {p.parent for p in out.rglob("*_patches.h5")}
    return folder


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_share_one_index_and_log_the_mean_of_their_losses(
    tile_list: Path, tmp_path: Path, strategy: str
) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    logs = _launch(script, tmp_path / "out", tile_list, strategy)
    # one index for both ranks (and both runs): the first to take its lock compiled it
    built = [line for log in logs for line in log.splitlines() if "built in" in line]
    assert len(built) == 1, built
    out = tmp_path / "out"
    local = json.loads((out / "local.json").read_text())
    rows = read_metrics(out / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2"]
    for step, row in enumerate(rows):
        r0, r1 = local[0][step], local[1][step]
        assert r0["total"] != pytest.approx(r1["total"], rel=1e-4)  # the ranks saw other tiles
        for key in LOSSES:
            assert float(row[key]) == pytest.approx((r0[key] + r1[key]) / 2, rel=1e-5), (step, key)
    # the snapshot after step 2 (iteration 1) holds the final teacher, gathered when sharded
    snap = load_training_weights(out / "run" / "eval" / "training_1")
    final = load_checkpoint(out / "run" / "checkpoint.pt")["model"]
    teacher = {k: v for k, v in final.items() if k.startswith("teacher.")}
    assert snap["model"].keys() == teacher.keys() and snap["step"] == 2
    assert all(torch.equal(snap["model"][k], teacher[k]) for k in teacher)
    (ev,) = read_metrics(out / "run" / "eval.csv")
    assert ev["step"] == "2" and 0.0 <= float(ev["linear_acc"]) <= 1.0
    assert int(ev["n_classes"]) == 2


CLI = """
import contextlib, os, sys, torch
torch.set_num_threads(1)
from gpfm_core.cli import main
out, lists, strategy = sys.argv[1:4]
with open(f"{out}/stdout{os.environ['RANK']}.txt", "w") as fh, contextlib.redirect_stdout(fh):
    code = main(["train", "--config", "tiny_cpu", "--out", f"{out}/run",
                 "--set", f"data.tile_lists=['{lists}']", "--set", "optim.batch_size=4",
                 "--set", "crops.local_crops_number=1", "--set", "optim.total_steps=2",
                 "--set", f"train.strategy={strategy}"])
sys.exit(code)
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gpfm_train_under_two_ranks_exits_cleanly(
    tile_list: Path, tmp_path: Path, strategy: str
) -> None:
    """``torchrun ... gpfm train`` ends with exit 0 on every rank (the wrapped model is released
    before the process group is left) and only rank 0 reports the checkpoint."""
    script = tmp_path / "cli.py"
    script.write_text(CLI)
    out = tmp_path / "out"
    _launch(script, out, tile_list, strategy)
    checkpoint = out / "run" / "checkpoint.pt"
    assert (out / "stdout0.txt").read_text() == f"trained 2 steps: {checkpoint}\n"
    assert (out / "stdout1.txt").read_text() == ""
    assert load_checkpoint(checkpoint)["step"] == 2
