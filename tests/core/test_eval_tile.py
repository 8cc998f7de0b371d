"""Tile protocols: kNN, retrieval, few-shot and the linear probe, and the demo tile task."""

from __future__ import annotations

import numpy as np
import pytest

from gpfm_core.errors import GpfmError
from gpfm_core.evaluation.tile import (
    LinearProbeConfig,
    _class_ranking,
    few_shot,
    knn_scores,
    linear_probe,
    retrieval,
    run_tile_protocols,
)

pytest_plugins = ["_eval_support"]


def _blobs(n: int, k: int, d: int, *, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    y = np.arange(n) % k
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_knn_votes_are_dinos_weighted_vote() -> None:
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    y = np.array([0, 1, 1, 2])
    query = np.array([[1, 0.05]], np.float32)
    got = knn_scores(train, y, query, n_classes=3, ks=(1, 3), temperature=0.07)
    assert np.array_equal(got[1], [[1.0, 0.0, 0.0]])  # the most similar item is class 0
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    sims = unit @ (query[0] / np.linalg.norm(query[0]))
    top = np.argsort(-sims)[:3]
    w = np.exp(sims[top] / 0.07)
    want = np.bincount(y[top], weights=w, minlength=3) / w.sum()
    assert np.allclose(got[3][0], want, atol=1e-5)


def test_retrieval_ranks_classes_by_rank_weighted_votes() -> None:
    # 1-d features; z-scoring keeps the order. Query at 0.1: nearest 0 (class 0), then 0.5
    # (class 1), then -0.6 (class 2): votes 1, 1/2, 1/3 -> order 0, 1, 2.
    train = np.array([[0.0], [0.5], [-0.6], [5.0], [6.0]], np.float32)
    y = np.array([0, 1, 2, 1, 2])
    order = _class_ranking(train, y, np.array([[0.1], [5.4]], np.float32), 3)
    assert order[0].tolist() == [0, 1, 2]
    # query at 5.4: nearest 5.0 (class 1), 6.0 (class 2), 0.5 (class 1): 1 + 1/3 vs 1/2
    assert order[1].tolist() == [1, 2, 0]


def test_retrieval_top_m_accuracy_is_macro() -> None:
    x, y = _blobs(120, 4, 8, spread=0.5, seed=1)
    res = retrieval(x[:80], y[:80], x[80:], y[80:], n_classes=4, n_resamples=200)
    assert set(res.metrics) == {"top1_macro", "top3_macro"}  # top-5 >= 4 classes: always 1
    assert res.metrics["top1_macro"].value == 1.0
    # one class made unrecognisable -> its recall is lost in the macro average
    noisy = x[80:].copy()
    noisy[y[80:] == 3] = 0.0
    res = retrieval(x[:80], y[:80], noisy, y[80:], n_classes=4, n_resamples=200)
    assert res.metrics["top1_macro"].value <= 0.75 + 1e-9


def test_few_shot_draws_per_class_and_reports_spread() -> None:
    x, y = _blobs(200, 3, 16, spread=2.5, seed=2)
    y[y == 2] = np.where(np.arange((y == 2).sum()) < 5, 2, 0)  # class 2: 5 training items
    res = few_shot(x[:150], y[:150], x[150:], y[150:], n_classes=3, shots=(1, 4, 8), repeats=4)
    assert [r.protocol for r in res] == ["fewshot-1", "fewshot-4"]  # 8 > 5 items: skipped
    again = few_shot(x[:150], y[:150], x[150:], y[150:], n_classes=3, shots=(1, 4, 8), repeats=4)
    for a, b in zip(res, again, strict=True):
        np.testing.assert_equal(
            {m: e.as_dict() for m, e in a.metrics.items()},
            {m: e.as_dict() for m, e in b.metrics.items()},
        )
    assert res[0].metrics["balanced_accuracy"].sd > 0  # different draws, different results


def test_linear_probe_learns_and_is_seeded() -> None:
    x, y = _blobs(600, 3, 32, spread=1.0, seed=3)
    cfg = LinearProbeConfig(max_epochs=30, min_steps=300)
    args = (x[:400], y[:400], x[400:500], y[400:500], x[500:])
    a, info = linear_probe(*args, n_classes=3, config=cfg, seed=0)
    b, _ = linear_probe(*args, n_classes=3, config=cfg, seed=0)
    c, _ = linear_probe(*args, n_classes=3, config=cfg, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a.argmax(axis=1) == y[500:]).mean() > 0.95
    assert np.allclose(a.sum(axis=1), 1.0, atol=1e-5)
    assert 1 <= info["best_epoch"] <= info["epochs"] <= 30


def test_protocols_need_every_split() -> None:
    x, y = _blobs(30, 2, 4, spread=1.0, seed=4)
    with pytest.raises(GpfmError, match="'val' split"):
        run_tile_protocols({"train": (x, y), "test": (x, y)}, n_classes=2)
    with pytest.raises(GpfmError, match="unknown protocol"):
        run_tile_protocols(
            {"train": (x, y), "val": (x, y), "test": (x, y)}, n_classes=2, protocols=["svm"]
        )


def test_demo_tile_task_is_deterministic_with_intervals_around_the_estimates(
    eval_demo, tmp_path
) -> None:
    """Linear probe, kNN and retrieval on the demo crops (hed-texture): seeded, with CIs."""
    from gpfm_core.evaluation import load_spec, run_tile_task

    task = next(t for t in load_spec(eval_demo.spec).tasks if t.kind == "tile")
    # the second run reads the features from the first run's cache: the protocols repeat
    runs = [
        run_tile_task(task, "hed-texture", out=tmp_path, seed=0, bootstrap=300, device="cpu")
        for _ in range(2)
    ]
    np.testing.assert_equal(runs[0].rows, runs[1].rows)  # NaN (no sd) compares equal here
    assert runs[0].encoder.weights_hash == "handcrafted"
    by = {(r["protocol"], r["metric"]): r for r in runs[0].rows}
    # the test split: 8 crops each of carcinoma, skin and glass (the cap) and the skin-edge
    # crops its blocks hold (fewer: edges are rare; how many follows the tissue detector)
    from collections import Counter

    from _eval_support import read_csv

    test_items = Counter(r["label"] for r in read_csv(eval_demo.tile_items) if r["split"] == "test")
    assert [test_items[c] for c in ("carcinoma", "skin", "glass")] == [8, 8, 8]
    assert 1 <= test_items["skin-edge"] <= 8
    checked = 0
    for (protocol, metric), r in by.items():
        if protocol.startswith(("linear", "knn", "retrieval")):
            assert r["ci_low"] <= r["value"] <= r["ci_high"], (protocol, metric)
            checked += 1
        assert r["n_test"] == sum(test_items.values())
    assert checked == 3 * 3 + 2  # linear, knn-1, knn-20 x 3 metrics + retrieval top-1, top-3
    # four classes, chance is 0.25: the machinery learns the regions
    assert by[("linear", "balanced_accuracy")]["value"] >= 0.75
    assert by[("knn-20", "balanced_accuracy")]["value"] >= 0.75
    assert by[("retrieval", "top1_macro")]["value"] >= 0.75
    assert (tmp_path / "predictions" / "tissue-tiles__hed-texture__linear.csv").is_file()
    assert (tmp_path / "features" / "tissue-tiles" / "hed-texture.h5").is_file()


def test_labelled_tiles_of_embedded_slides(eval_demo, tmp_path) -> None:
    """A tile task over tiles of embedded slides, matched on their level-0 corner."""
    from _eval_support import read_csv

    from gpfm_core.evaluation import load_spec, run_tile_task

    rows = read_csv(eval_demo.tile_truth)
    slides = sorted({r["slide_id"] for r in rows})
    split_of = {
        s: ("test" if i % 4 == 0 else "val" if i % 4 == 1 else "train")
        for i, s in enumerate(slides)
    }
    lines = [
        f"{r['slide_id']},{r['x']},{r['y']},{r['tissue']},{split_of[r['slide_id']]}"
        for r in rows[::3]
    ]
    (tmp_path / "tiles.csv").write_text("slide_id,x,y,label,split\n" + "\n".join(lines) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "tasks:\n  - name: slide-tiles\n    type: tile\n    items: tiles.csv\n"
        f"    features: {eval_demo.root}/features/{{encoder}}\n    protocols: [knn]\n"
    )
    task = load_spec(spec).tasks[0]
    out = run_tile_task(task, "hed-texture", out=tmp_path, seed=0, bootstrap=100)
    by = {(r["protocol"], r["metric"]): r["value"] for r in out.rows}
    assert by[("knn-20", "balanced_accuracy")] >= 0.9  # carcinoma vs skin tiles
    assert out.encoder.tiling["tile_px"] == 224
    bad = (
        "slide_id,x,y,label,split\ndemo_slide_00,5,5,skin,train\ndemo_slide_00,0,0,carcinoma,test\n"
    )
    (tmp_path / "tiles.csv").write_text(bad)
    with pytest.raises(GpfmError, match="no tile at x=5, y=5"):
        run_tile_task(task, "hed-texture", out=tmp_path, seed=0, bootstrap=100)
