"""The evaluation hook's pieces: the held-out labelled tile sets, the kNN / linear-probe scores,
the config checks of the data-path keys, and snapshots that are not gpfm train's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpfm_core.errors import ConfigError
from gpfm_core.train import load_config
from gpfm_core.train.checkpoint import CheckpointError
from gpfm_core.train.eval_hook import build_eval_set, embed_tiles, score
from gpfm_core.train.loop import build
from gpfm_core.train.snapshots import load_training_weights

torch.set_num_threads(1)


def test_holdout_task_is_the_held_out_tiles_labelled_by_slide(
    he_png: Path, cmu_svs: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        "tiny_cpu",
        overrides=[
            f"data.sources=['{he_png}', '{cmu_svs}']",
            "data.assume_mpp=0.5",
            "data.holdout_every=3",
            "eval.task=holdout",
            "eval.n_per_class=10",
        ],
    )
    ev = build_eval_set(cfg, index=tmp_path / "i.tileindex")
    assert ev.task == "holdout" and ev.tiles.shape == (20, 64, 64, 3)
    assert np.bincount(ev.labels).tolist() == [10, 10]
    # they are tiles of the holdout split, never of the training split
    from gpfm_core.train.data import build_dataset

    held = build_dataset(cfg["data"], split="holdout", index=tmp_path / "i.tileindex")
    train = build_dataset(cfg["data"], index=tmp_path / "i.tileindex")
    held_tiles = {held[i].tobytes() for i in range(len(held))}
    assert all(t.tobytes() in held_tiles for t in ev.tiles)
    train_tiles = {train[i].tobytes() for i in range(len(train))}
    assert not any(t.tobytes() in train_tiles for t in ev.tiles)


def test_scores_separate_informative_from_random_features() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    informative = rng.normal(size=(80, 16)) + 6.0 * np.eye(16)[labels]  # class directions
    good = score(informative, labels, k=5, folds=5, seed=0)
    assert good["knn_acc"] >= 0.95 and good["linear_acc"] >= 0.95
    noise = score(rng.normal(size=(80, 16)), labels, k=5, folds=5, seed=0)
    assert noise["knn_acc"] < 0.75 and noise["linear_acc"] < 0.75


def test_the_teacher_embeds_eval_tiles_without_touching_the_training_state(
    he_png: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        "tiny_cpu",
        overrides=[
            f"data.sources=['{he_png}']",
            "data.assume_mpp=0.5",
            "student.drop_path_rate=0.2",
        ],
    )
    state = build(cfg, tmp_path)
    state.model.train()
    rng_before = torch.get_rng_state()
    tiles = np.random.default_rng(1).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    feats = embed_tiles(state.model, tiles, size=56, batch_size=2)
    assert feats.shape == (5, 64) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert torch.equal(torch.get_rng_state(), rng_before)  # no random draw
    assert state.model.teacher["backbone"].training  # its mode restored
    again = embed_tiles(state.model, tiles[:2], size=56, batch_size=2)
    np.testing.assert_allclose(again, feats[:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("data.num_workers=-1", "data.num_workers"),
        ("data.max_open_slides=0", "data.max_open_slides"),
        ("data.holdout_every=1", "data.holdout_every"),
        ("train.snapshot_every=-5", "train.snapshot_every"),
        ("eval.task=imagenet", "eval.task"),
        ("eval.folds=1", "eval.folds"),
        ("eval.every=10", "data.holdout_every >= 2"),  # with eval.task holdout, below
    ],
)
def test_bad_data_path_settings_are_one_line(item: str, match: str, tmp_path: Path) -> None:
    extra = ["eval.task=holdout"] if item.startswith("eval.every") else []
    cfg = load_config("tiny_cpu", overrides=[item, *extra])
    with pytest.raises(ConfigError, match=match) as info:
        build(cfg, tmp_path)
    assert "\n" not in str(info.value)


def test_a_foreign_teacher_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    """GPFM's own teacher_checkpoint.pth has no config: it cannot be exported as a gpfm run's."""
    path = tmp_path / "eval" / "training_87499"
    path.mkdir(parents=True)
    torch.save(
        {"teacher": {"backbone.cls_token": torch.zeros(1, 1, 4)}}, path / "teacher_checkpoint.pth"
    )
    with pytest.raises(CheckpointError, match="neither a gpfm train checkpoint") as info:
        load_training_weights(path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_training_weights(tmp_path / "eval" / "training_1")
