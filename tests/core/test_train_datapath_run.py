"""End to end: ``gpfm train --config tiny_cpu`` from an ``.h5`` tile list with two loader worker
processes writes teacher snapshots, evaluation logs and TensorBoard scalars, and a run stopped
and resumed takes exactly the steps of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpfm_core.cli import main
from gpfm_core.train.checkpoint import load_checkpoint
from gpfm_core.train.logging_csv import read_metrics
from gpfm_core.train.snapshots import list_snapshots, load_training_weights

torch.set_num_threads(1)

LOSSES = ("dino", "koleo", "ibot", "expert_tiny_expert_cls", "expert_tiny_expert_patch", "total")


def _train(out: Path, sets: list[str], *extra: str) -> None:
    argv = ["train", "--config", "tiny_cpu", "--out", str(out), *extra]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.fixture
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)


def test_tiny_cpu_from_a_tile_list_with_workers_snapshots_eval_and_exact_resume(
    cmu_svs: Path, tmp_path: Path, deterministic: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "tiles",
                str(cmu_svs),
                "--mpp",
                "1.0",
                "--tile-px",
                "64",
                "--out",
                str(tmp_path / "store"),
            ]
        )
        == 0
    )
    (patches,) = {p.parent for p in (tmp_path / "store").rglob("*_patches.h5")}
    sets = [
        f"data.tile_lists=['{patches}']",
        "data.num_workers=2",
        "data.cache_in_memory=false",
        "deterministic=true",
        "optim.total_steps=6",
        "optim.batch_size=4",
        "crops.local_crops_number=1",
        "student.drop_path_rate=0.2",  # drop-path draws from torch's global RNG: resumed too
        "train.snapshot_every=2",
        "train.checkpoint_every=1000",
        "eval.every=3",
        "eval.n_per_class=16",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    _train(full, sets)
    _train(part, [*sets, "train.stop_after=3"])
    index = (part / "tiles.tileindex").stat()
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 3
    _train(part, sets, "--resume")
    capsys.readouterr()
    # the index compiled by the first invocation is mapped again, not rebuilt
    assert (part / "tiles.tileindex").stat().st_ino == index.st_ino
    # the same steps: every loss term at every step (the data order decides them) ...
    a, b = read_metrics(full / "metrics.csv"), read_metrics(part / "metrics.csv")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    for ra, rb in zip(a, b, strict=True):
        for key in (*LOSSES, "lr", "grad_norm"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-6, abs=1e-6), (
                ra["step"],
                key,
            )
        assert ra["tiles_skipped"] == rb["tiles_skipped"] == "0"
    # ... the same weights at the end
    wa = load_checkpoint(full / "checkpoint.pt")["model"]
    wb = load_checkpoint(part / "checkpoint.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # teacher snapshots every 2 steps, GPFM's names (0-based iteration), kept beside the checkpoint
    snaps = list_snapshots(part)
    assert [s for s, _ in snaps] == [2, 4, 6] == [s for s, _ in list_snapshots(full)]
    assert snaps[-1][1] == part / "eval" / "training_5" / "teacher_checkpoint.pth"
    for (_, pa), (_, pb) in zip(list_snapshots(full), snaps, strict=True):
        ta, tb = (load_training_weights(p)["model"] for p in (pa, pb))
        assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
    last = load_training_weights(snaps[-1][1])
    assert last["step"] == 6
    for k, v in last["model"].items():  # the last snapshot is the final EMA teacher
        assert torch.allclose(v, wb[k], atol=0), k
    # evaluation every 3 steps: kNN and linear probe on the built-in task, logged
    ea, eb = read_metrics(full / "eval.csv"), read_metrics(part / "eval.csv")
    assert [r["step"] for r in eb] == ["3", "6"]
    for ra, rb in zip(ea, eb, strict=True):
        assert int(rb["n_classes"]) == 2 and int(rb["n_tiles"]) == 32
        for key in ("knn_acc", "linear_acc"):
            assert 0.0 <= float(rb[key]) <= 1.0
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-6), key
    # TensorBoard beside the CSV, the same values
    tb = _scalars(full)
    assert [s for s, _ in tb["total"]] == list(range(1, 7))
    for (_, value), row in zip(tb["total"], a, strict=True):
        assert value == pytest.approx(float(row["total"]), rel=1e-6)
    assert [s for s, _ in tb["eval/knn_acc"]] == [3, 6]
    # `gpfm export` takes a snapshot folder: the exported encoder is that teacher's backbone
    out = tmp_path / "snap.safetensors"
    assert main(["export", str(part / "eval" / "training_5"), "--out", str(out)]) == 0
    exported = load_file(out)
    prefix = "teacher.backbone.model."
    teacher = {k[len(prefix) :]: v for k, v in last["model"].items() if k.startswith(prefix)}
    assert exported.keys() == teacher.keys()
    assert all(torch.equal(exported[k], teacher[k]) for k in teacher)
    from gpfm_core.encoders import create_encoder

    enc = create_encoder(out)
    assert enc.meta.embed_dim == 64 and "step 6" in enc.meta.source
