"""The demo data (issue 13, item 3), and that ABMIL finds nothing where there is nothing.

The learning checks with signal (AUROC, c-index, attention) read the ``gpfm eval`` report
in ``test_eval_cli.py``; this module holds the null checks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from _eval_support import read_csv, tile_truth

from gpfm_core.embed import embed_slide, load_embeddings
from gpfm_core.errors import ConfigError, GpfmError
from gpfm_core.evaluation import load_spec, make_demo_data, run_slide_task
from gpfm_core.evaluation.demo import THRESHOLD

pytest_plugins = ["_eval_support"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_features_equal_embedding_the_slide(eval_demo, tmp_path: Path) -> None:
    """The copied pool features are what the real pipeline computes from the slide file."""
    slide = eval_demo.slides[3]
    path = embed_slide(
        slide, encoder="hed-texture", out_dir=tmp_path, device="cpu"
    )  # default tiling
    ours = load_embeddings(eval_demo.features["hed-texture"] / f"{slide.stem}.h5")
    real = load_embeddings(path)
    assert np.array_equal(real.coords, ours.coords)  # tissue detection keeps all 64 tiles
    assert np.allclose(real.features, ours.features, atol=1e-5)
    for key in ("slide_id", "encoder", "weights_hash", "tile_px", "requested_mpp", "level0_width"):
        assert real.attrs[key] == ours.attrs[key], key


def test_finer_feature_tiles_equal_embedding_the_slide_at_that_tiling(
    eval_demo, tmp_path: Path, data_dir: Path
) -> None:
    """tile_px=112: each 224 px slide tile is 2 x 2 feature tiles, as embedding the slide
    file at 112 px gives (the tiling a gpfm-student session has in the dock)."""
    sources = {
        "skin": data_dir / "cmu_small_region.svs",
        "carcinoma": data_dir / "he_patch_1000.png",
    }
    fine = make_demo_data(
        tmp_path / "fine", encoders=("hed-texture",), sources=sources, tile_px=112
    )
    slide = fine.slides[3]
    assert _sha(slide) == _sha(eval_demo.slides[3])  # the same slides
    path = embed_slide(
        slide, encoder="hed-texture", out_dir=tmp_path / "real", mpp=0.5, tile_px=112,
        device="cpu",
    )  # fmt: skip
    ours = load_embeddings(fine.features["hed-texture"] / f"{slide.stem}.h5")
    real = load_embeddings(path)
    assert ours.features.shape[0] == 16 * 16
    assert np.array_equal(real.coords, ours.coords) and np.array_equal(real.grid_rc, ours.grid_rc)
    assert np.allclose(real.features, ours.features, atol=1e-5)
    for key in ("tile_px", "requested_mpp", "level0_width", "weights_hash"):
        assert real.attrs[key] == ours.attrs[key], key
    coarse, finer = tile_truth(eval_demo)[slide.stem], tile_truth(fine)[slide.stem]
    assert np.array_equal(finer.reshape(16, 16), np.kron(coarse.reshape(8, 8), np.ones((2, 2))))
    with pytest.raises(GpfmError, match="tile_px must divide 224"):
        make_demo_data(tmp_path / "odd", encoders=(), sources=sources, tile_px=100)


def test_slides_differ_by_their_carcinoma_share(eval_demo) -> None:
    rows = read_csv(eval_demo.slides_csv)
    truth = tile_truth(eval_demo)
    assert len(rows) == 40
    share = np.array([float(r["carcinoma_share"]) for r in rows])
    labels = np.array([r["label"] for r in rows])
    assert (labels == "high").sum() == 20
    assert np.array_equal(labels == "high", share > THRESHOLD)
    # harder than "is there carcinoma": every slide has some, the low ones too
    assert share[labels == "low"].min() >= 0.03 and share[labels == "low"].max() <= 0.15
    assert share[labels == "high"].min() >= 0.25
    for r in rows:
        assert truth[r["slide_id"]].mean() == pytest.approx(float(r["carcinoma_share"]), abs=1e-4)
        assert len(truth[r["slide_id"]]) == 64
    months = np.array([float(r["survival_months"]) for r in rows])
    censored = np.array([int(r["censorship"]) for r in rows])
    assert months.min() > 0 and 0.1 <= censored.mean() <= 0.6
    # the time to event falls with the share (Spearman on the uncensored slides)
    ev = censored == 0
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(share[ev]), rank(months[ev]))[0, 1] < -0.5


def test_the_written_spec_states_the_datas_censored_share(eval_demo) -> None:
    """demo.yaml said "~1/3 censored" while the data (and README) have 20 %: it is counted now."""
    censored = [int(r["censorship"]) for r in read_csv(eval_demo.slides_csv)]
    assert (sum(censored), len(censored)) == (8, 40)  # seed 0: 20 %, as README.md says
    text = eval_demo.spec.read_text(encoding="utf-8")
    (line,) = [ln for ln in text.splitlines() if "censored" in ln and ln.lstrip().startswith("#")]
    assert line.endswith("falls with the carcinoma share; 8 of 40 slides censored (20 %)"), line
    assert "1/3" not in text
    assert "carcinoma-share-survival" in _tasks(eval_demo)  # only a comment changed


def test_tile_task_splits_share_no_pixel(eval_demo) -> None:
    items = read_csv(eval_demo.tile_items)
    counts: dict[tuple[str, str], int] = {}
    for r in items:
        counts[(r["label"], r["split"])] = counts.get((r["label"], r["split"]), 0) + 1
        assert (eval_demo.tile_items.parent / r["path"]).is_file()
    assert {k for k, _ in counts} == {"carcinoma", "skin", "skin-edge", "glass"}
    assert all(counts.get((c, s), 0) >= 4 for c, _ in counts for s in ("train", "val", "test"))
    for a in items:
        for b in items:
            if a["source"] == b["source"] and a["split"] != b["split"]:
                dx, dy = abs(int(a["x"]) - int(b["x"])), abs(int(a["y"]) - int(b["y"]))
                assert dx >= 224 or dy >= 224, (a, b)


def test_the_demo_is_reproducible_and_its_folder_guarded(
    eval_demo, tmp_path: Path, data_dir: Path
) -> None:
    sources = {
        "skin": data_dir / "cmu_small_region.svs",
        "carcinoma": data_dir / "he_patch_1000.png",
    }
    again = make_demo_data(tmp_path / "again", encoders=(), sources=sources)
    for name in (
        "slides/slides.csv",
        "slides/tile_truth.csv",
        "tiles/items.csv",
        "slides/demo_slide_07.svs",
    ):
        assert _sha(again.root / name) == _sha(eval_demo.root / name), name
    with pytest.raises(GpfmError, match="other parameters"):
        make_demo_data(tmp_path / "again", encoders=(), sources=sources, seed=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.docx").write_text("keep me")
    with pytest.raises(GpfmError, match="not empty"):
        make_demo_data(tmp_path / "busy", encoders=(), sources=sources)
    assert (tmp_path / "busy" / "thesis.docx").read_text() == "keep me"


def test_case_bags_join_a_patients_slides(eval_demo, tmp_path: Path) -> None:
    rows = read_csv(eval_demo.slides_csv)
    by_label: dict[str, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["slide_id"])
    case_of = {
        s: f"case-{lab}-{i // 2}" for lab, ids in by_label.items() for i, s in enumerate(ids)
    }
    csv_text = "slide_id,case_id,label\n" + "".join(
        f"{r['slide_id']},{case_of[r['slide_id']]},{r['label']}\n" for r in rows
    )
    (tmp_path / "cases.csv").write_text(csv_text)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "tasks:\n  - name: cases\n    type: slide\n    items: cases.csv\n    bag: case\n"
        f"    features: {eval_demo.root}/features/{{encoder}}\n    classes: [low, high]\n"
        "    splits: {folds: 4}\n    abmil: {max_epochs: 3, min_epochs: 1}\n"
    )
    task = load_spec(spec).tasks[0]
    out = run_slide_task(task, "hed-texture", out=None, seed=0, bootstrap=0)
    assert sorted(out.slides) == sorted(set(case_of.values()))  # 20 patients, 2 slides each
    assert all(s["output"].attention.shape == (128,) for s in out.slides.values())
    (tmp_path / "cases.csv").write_text(
        csv_text.replace("demo_slide_00,case-", "demo_slide_00,odd-", 1)
    )
    rows[0]["label"] = "high" if rows[0]["label"] == "low" else "low"
    bad = "slide_id,case_id,label\n" + "".join(
        f"{r['slide_id']},{case_of[r['slide_id']]},{r['label']}\n" for r in rows
    )
    (tmp_path / "cases.csv").write_text(bad)
    with pytest.raises(ConfigError, match="disagree on label"):
        run_slide_task(task, "hed-texture", out=None, seed=0, bootstrap=0)


def _tasks(eval_demo):
    return {t.name: t for t in load_spec(eval_demo.spec).tasks}


def test_shuffled_labels_give_chance_auroc(eval_demo) -> None:
    """Labels shuffled within pairs of slides of neighbouring carcinoma share.

    Restricting the shuffle to matched pairs keeps the null labels from correlating with the
    share by chance (with 40 slides a free shuffle often does, and its AUROC then strays
    from 0.5 by +-0.2 whatever the model); the labels still say nothing about the tissue.
    """
    rows = read_csv(eval_demo.slides_csv)
    order = np.argsort([float(r["carcinoma_share"]) for r in rows], kind="stable")
    task = _tasks(eval_demo)["carcinoma-share"]
    aucs = []
    for k in range(3):
        rng = np.random.default_rng(300 + k)
        labels = np.empty(len(rows), np.int64)
        for a, b in order.reshape(-1, 2):
            labels[a] = rng.integers(0, 2)
            labels[b] = 1 - labels[a]
        out = run_slide_task(
            task, "gpfm-student", out=None, seed=0, bootstrap=0, labels_override=labels
        )
        aucs.append(next(r["value"] for r in out.rows if r["metric"] == "auroc_macro"))
    assert abs(np.mean(aucs) - 0.5) <= 0.15, aucs


def test_permuted_survival_gives_chance_c_index(eval_demo) -> None:
    task = _tasks(eval_demo)["carcinoma-share-survival"]
    cs = []
    for k in range(4):
        perm = np.random.default_rng(200 + k).permutation(40)
        out = run_slide_task(
            task, "gpfm-student", out=None, seed=0, bootstrap=0, labels_override=perm
        )
        cs.append(out.rows[0]["value"])
    assert abs(np.mean(cs) - 0.5) <= 0.15, cs
