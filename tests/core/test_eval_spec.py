"""Task specs, splits and folds, feature lookup, and the rank table."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.errors import ConfigError, GpfmError
from gpfm_core.evaluation.features import find_slide_features, strip_slide_suffix
from gpfm_core.evaluation.report import average_ranks
from gpfm_core.evaluation.spec import load_spec, read_items, slide_folds, tile_splits


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _spec(tmp_path: Path, tasks: str, extra: str = "") -> Path:
    return _write(tmp_path / "spec.yaml", f"name: t\n{extra}tasks:\n{tasks}")


@pytest.mark.parametrize(
    ("tasks", "extra", "message"),
    [
        ("  - {name: a, type: tile}\n", "", "exactly one of items"),
        ("  - {name: a, type: wsi, items: x.csv}\n", "", "type must be one of"),
        ("  - {name: a, type: slide, items: x.csv}\n", "", "need features"),
        ("  - {name: a, type: tile, items: x.csv, shots: 3}\n", "", "unknown key"),
        (
            "  - {name: a, type: tile, items: x.csv}\n  - {name: a, type: tile, items: y.csv}\n",
            "",
            "unique",
        ),
        ("  - {name: a, type: tile, items: x.csv, classes: [one]}\n", "", "at least two"),
        ("  - {name: a, type: tile, items: x.csv}\n", "sead: 1\n", "unknown key"),
        (
            "  - {name: a, type: tile, items: x.csv, primary: {metric: auc}}\n",
            "",
            "primary must be",
        ),
        (
            "  - {name: a, type: slide, items: x.csv, features: f, missing: ignore}\n",
            "",
            "missing must be",
        ),
    ],
)
def test_bad_specs_give_one_line(tmp_path: Path, tasks: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_spec(_spec(tmp_path, tasks, extra))
    assert "\n" not in str(err.value)


def test_spec_paths_are_relative_to_the_file_or_root(tmp_path: Path) -> None:
    block = "  - name: a\n    type: slide\n    items: s.csv\n    features: feats/{encoder}\n"
    spec = load_spec(_spec(tmp_path, block))
    task = spec.tasks[0]
    assert task.items == tmp_path / "s.csv"
    assert task.features_dir("uni") == tmp_path / "feats" / "uni"
    assert task.features_dir("/ckpt/my_model.pth") == tmp_path / "feats" / "my_model"
    assert task.primary_metric == ("abmil", "auroc_macro")
    other = load_spec(tmp_path / "spec.yaml", root=tmp_path / "data")
    assert other.tasks[0].items == tmp_path / "data" / "s.csv"
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    _write(tmp_path / "bad.yaml", "tasks: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_class_folders_become_items(tmp_path: Path) -> None:
    from PIL import Image

    for split, cls, n in [
        ("NCT", "ADI", 3),
        ("NCT", "TUM", 2),
        ("VAL", "ADI", 1),
        ("VAL", "TUM", 1),
    ]:
        for i in range(n):
            (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / f"{i}.tif")
    (tmp_path / "NCT" / "ADI" / "notes.txt").write_text("not an image")
    spec = load_spec(
        _spec(tmp_path, "  - {name: crc, type: tile, folders: {train: NCT, test: VAL}}\n")
    )
    rows = read_items(spec.tasks[0])
    assert len(rows) == 7
    assert {(r["label"], r["split"]) for r in rows} == {
        ("ADI", "train"),
        ("TUM", "train"),
        ("ADI", "test"),
        ("TUM", "test"),
    }


def test_tile_splits_carve_validation_from_train(tmp_path: Path) -> None:
    rows = [
        {"path": f"{i}.png", "label": "ab"[i % 2], "split": "test" if i < 10 else "train"}
        for i in range(60)
    ]
    _write(
        tmp_path / "i.csv",
        "path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows),
    )
    task = load_spec(
        _spec(tmp_path, "  - {name: a, type: tile, items: i.csv, splits: {val: 0.2}}\n")
    ).tasks[0]
    items = read_items(task)
    y = np.array([0 if r["label"] == "a" else 1 for r in items])
    split = tile_splits(task, items, y, seed=0)
    assert (split == "test").sum() == 10
    assert (split == "val").sum() == 10  # 20 % of the 50 train items, stratified
    assert set(y[split == "val"]) == {0, 1}
    assert np.array_equal(split, tile_splits(task, items, y, seed=0))


def _slide_task(tmp_path: Path, header: str, lines: list[str], splits: str = "{folds: 5}"):
    _write(tmp_path / "s.csv", header + "\n" + "\n".join(lines) + "\n")
    spec = load_spec(
        _spec(
            tmp_path, f"  - {{name: s, type: slide, items: s.csv, features: f, splits: {splits}}}\n"
        )
    )
    return spec.tasks[0], read_items(spec.tasks[0])


def test_k_fold_tests_each_slide_once_and_keeps_cases_together(tmp_path: Path) -> None:
    lines = [f"s{i},{'ab'[i % 2]},case{i // 2}" for i in range(40)]
    task, rows = _slide_task(tmp_path, "slide_id,label,case_id", lines)
    y = np.array([i % 2 for i in range(40)])
    folds = slide_folds(task, rows, y, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(40))
    for f in folds:
        assert not (
            set(f.train) & set(f.val) | set(f.train) & set(f.test) | set(f.val) & set(f.test)
        )
        assert len(f.train) + len(f.val) + len(f.test) == 40
        cases = lambda idx: {rows[i]["case_id"] for i in idx}  # noqa: E731
        assert not (cases(f.test) & cases(f.train))  # a patient's slides stay in one fold
        assert set(y[f.test]) == {0, 1}


def test_split_and_fold_columns_are_used(tmp_path: Path) -> None:
    lines = [f"s{i},{'ab'[i % 2]},{['train', 'train', 'val', 'test'][i % 4]}" for i in range(16)]
    task, rows = _slide_task(tmp_path, "slide_id,label,split", lines)
    (f,) = slide_folds(task, rows, np.arange(16) % 2, seed=0)
    assert len(f.train) == 8 and len(f.val) == 4 and len(f.test) == 4
    lines = [f"s{i},{'ab'[i % 2]},{['train', 'train', 'train', 'test'][i % 4]}" for i in range(40)]
    task, rows = _slide_task(tmp_path, "slide_id,label,split", lines)
    (f,) = slide_folds(task, rows, np.arange(40) % 2, seed=0)  # official train/test: val carved
    assert len(f.test) == 10 and len(f.val) == 3 and len(f.train) == 27
    assert set((np.arange(40) % 2)[f.val]) == {0, 1}
    lines = [f"s{i},{'ab'[i % 2]},{i % 3}" for i in range(12)]
    task, rows = _slide_task(tmp_path, "slide_id,label,fold", lines)
    folds = slide_folds(task, rows, np.arange(12) % 2, seed=0)
    assert [sorted(f.test) for f in folds] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert sorted(folds[0].val) == [1, 4, 7, 10]  # fold i validates on fold i + 1
    task, rows = _slide_task(tmp_path, "slide_id,label", lines[:4], splits="{folds: 5}")
    with pytest.raises(ConfigError, match="cannot make 5 folds"):
        slide_folds(task, [{"slide_id": "a", "label": "a"}] * 4, np.zeros(4, int), seed=0)
    with pytest.raises(ConfigError, match="split 'holdout'"):
        _slide_task(tmp_path, "slide_id,label,split", ["a,x,holdout"])


def _h5(path: Path, encoder: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 3), np.float32))
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        f.attrs["encoder"] = encoder
    return path


def test_slide_features_are_found_at_any_depth(tmp_path: Path) -> None:
    a = _h5(tmp_path / "job" / "20x_224px_0px_overlap" / "features_uni" / "TCGA-01.h5", "uni")
    b = _h5(tmp_path / "flat" / "TCGA-02.h5", "uni")
    found = find_slide_features(tmp_path, ["TCGA-01.svs", "TCGA-02"])
    assert found == {"TCGA-01.svs": a, "TCGA-02": b}
    assert strip_slide_suffix("x.y.ndpi") == "x.y"
    _h5(tmp_path / "other" / "TCGA-01.h5", "conch")
    assert find_slide_features(tmp_path, ["TCGA-01"], encoder="uni") == {"TCGA-01": a}
    with pytest.raises(GpfmError, match="2 feature files"):
        find_slide_features(tmp_path, ["TCGA-01"])
    with pytest.raises(GpfmError, match="1 of 2 slide"):
        find_slide_features(tmp_path / "flat", ["TCGA-02", "TCGA-03"])
    with pytest.warns(UserWarning, match="left out"):
        assert find_slide_features(tmp_path / "flat", ["TCGA-02", "TCGA-03"], missing="skip") == {
            "TCGA-02": b
        }
    with pytest.raises(GpfmError, match="gpfm embed"):
        find_slide_features(tmp_path / "nowhere", ["x"])


def test_average_ranks_as_the_paper() -> None:
    rows = [
        {"task": t, "encoder": e, "protocol": "p", "metric": "m", "value": v}
        for t, vals in {
            "t1": (0.9, 0.8, 0.7),
            "t2": (0.6, 0.6, 0.9),
            "t3": (0.5, 0.7, float("nan")),
        }.items()
        for e, v in zip(("A", "B", "C"), vals, strict=True)
    ]
    ranks, tasks = average_ranks(rows, {"t1": ("p", "m"), "t2": ("p", "m"), "t3": ("p", "m")})
    by = {r["encoder"]: r for r in ranks}
    assert tasks == ["t1", "t2", "t3"]
    assert by["A"]["rank_t2"] == by["B"]["rank_t2"] == 2.5  # a tie shares the mean rank
    assert "rank_t3" not in by["C"]  # no finite value: not ranked on that task
    assert by["A"]["average_rank"] == pytest.approx((1 + 2.5 + 2) / 3)
    assert by["C"]["average_rank"] == pytest.approx((3 + 1) / 2)
    assert [r["encoder"] for r in ranks] == ["A", "B", "C"]
    assert by["A"]["wins"] == 1 and by["C"]["wins"] == 1
