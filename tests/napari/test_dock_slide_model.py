"""Slide model tab: a trained ABMIL model loads, applies to the embedded slide, shows its answer,
its attention on the tiles and the most attended tiles; models of other features are refused.

The model is trained here (real torch, a tiny ABMIL) on bags of the CMU slide's own tiny-vit
tiles, with the provenance ``gpfm train-mil`` records (read from the features file).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dock_support import tile_world_centre
from napari.layers import Image
from qtpy.QtCore import Qt
from safetensors.numpy import save_file

from gpfm_core.embed import load_embeddings
from gpfm_core.evaluation import MILConfig, SlideBags, SlideModel, apply_slide_model, train_abmil
from gpfm_core.evaluation.features import slide_encoder_info
from napari_gpfm._layers import viewer_camera
from napari_gpfm._widget import _overlays as ov

pytest_plugins = ["_dock_support"]

CONFIG = MILConfig(hidden=32, attn_dim=16, max_epochs=12, min_epochs=4, patience=4)


def _features_file(folder: Path) -> Path:
    """The CMU slide's tiny-vit file (other dock tests embed other slides into the folder)."""
    (path,) = sorted(folder.glob("0.5mpp_112px_0px_overlap/features_tiny-vit-*/cmu_small_region.h5"))
    return path


@pytest.fixture(scope="module")
def trained(cmu_embeddings: Path) -> SlideModel:
    """ABMIL on 24 bags of 40 CMU tiles: positive bags hold 30-50 % tiles of one end of the
    slide's first principal axis, negative ones 0-10 %."""
    path = _features_file(cmu_embeddings)
    feats = load_embeddings(path).features
    centred = feats - feats.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    score = centred @ axis
    signal = np.flatnonzero(score >= np.quantile(score, 0.8))
    rest = np.flatnonzero(score < np.quantile(score, 0.8))
    rng = np.random.default_rng(0)
    bags, labels = [], []
    for i in range(24):
        k = int(40 * (rng.uniform(0.3, 0.5) if i % 2 else rng.uniform(0.0, 0.1)))
        idx = np.concatenate([rng.choice(signal, k), rng.choice(rest, 40 - k)])
        bags.append(feats[idx])
        labels.append(i % 2)
    info = slide_encoder_info({"cmu": path}, "")  # what gpfm train-mil records
    order = np.arange(24)
    res = train_abmil(
        SlideBags(bags), task="classification", train=order[:18], val=order[18:],
        labels=np.array(labels), class_names=["quiet", "busy"], config=CONFIG, seed=0,
        encoder=info.name, weights_hash=info.weights_hash, tiling=dict(info.tiling),
    )  # fmt: skip
    return res.model


def _save(model: SlideModel, folder: Path, name: str, **changes: Any) -> Path:
    return replace(model, _module=None, **changes).save(folder / f"{name}.safetensors")


def test_a_trained_model_applies_with_its_answer_attention_and_top_tiles(
    embedded: Any, trained: SlideModel, tmp_path: Path, qtbot: Any, notes: Any
) -> None:
    viewer, dock, session = embedded
    tab = dock.slide_model_tab
    dock.tabs.setCurrentWidget(tab)
    path = _save(trained, tmp_path, "model")
    assert tab.load_model(path, sync=True)
    assert notes() == []
    ref = apply_slide_model(SlideModel.load(path), session.features)  # fp32, independent

    # the answer: prediction and every class probability, as apply_slide_model gives them
    p = ref.probabilities
    text = tab.answer_label.text()
    assert text.startswith(f"Prediction: {ref.prediction} (p = {p.max():.2f}).")
    for name, value in zip(trained.class_names, p, strict=True):
        assert f"{name} {value:.2f}" in text
    assert "quiet, busy" in tab.model_label.text() and session.encoder in tab.model_label.text()
    res = tab.result(session)
    assert res.output.precision == "fp32"  # a small slide: auto stays in fp32
    np.testing.assert_array_equal(res.output.attention, ref.attention)

    # gpfm: attention: each tile's attention rank / N on its own grid cell, nothing elsewhere
    layer = ov.find(viewer, ov.ATTENTION, session)
    assert isinstance(layer, Image) and layer.name == f"gpfm: attention ({session.name})"
    assert ov.info(layer)["slide_id"] == session.key and layer.visible
    n = session.n_tiles
    expected = (np.argsort(np.argsort(ref.attention, kind="stable"), kind="stable") + 1) / n
    rc = session.grid_rc
    np.testing.assert_allclose(layer.data[rc[:, 0], rc[:, 1]], expected, atol=1e-6)
    empty = np.ones(session.grid_shape, bool)
    empty[rc[:, 0], rc[:, 1]] = False
    assert empty.any() and (layer.data[empty] < layer.contrast_limits[0]).all()  # transparent
    assert tuple(layer.contrast_limits) == (0.0, 1.0)
    # pixel-exact: each cell spans exactly its tile's level-0 pixels on the slide
    slide = viewer.layers[session.name]
    (tx, ty) = session.tile_size_xy
    for i in np.linspace(0, n - 1, 7).astype(int):
        (x, y), (r, c) = session.coords[i], rc[i]
        got = [layer.data_to_world([r - 0.5, c - 0.5]), layer.data_to_world([r + 0.5, c + 0.5])]
        want = [
            slide.data_to_world([y - 0.5, x - 0.5]),
            slide.data_to_world([y + ty - 0.5, x + tx - 0.5]),
        ]
        np.testing.assert_allclose(got, want, atol=1e-9)
    # shown alone: the slide's other analysis overlays are hidden
    for kind in ("coverage", "clusters", "similarity", "prediction"):
        assert all(not ly.visible for ly in ov.layers_of(viewer, session.key, (kind,)))

    # the gallery: the k most attended tiles, most attended first, with their softmax weight
    k = tab.k_spin.value()
    top = np.argsort(-ref.attention, kind="stable")[:k]
    assert [h.index for h in tab.hits] == top.tolist()
    assert all(
        ref.attention[a.index] >= ref.attention[b.index] for a, b in itertools.pairwise(tab.hits)
    )
    weight = np.exp(ref.attention - ref.attention.max())
    weight /= weight.sum()
    np.testing.assert_allclose([h.score for h in tab.hits], weight[top], rtol=1e-5)
    assert len(tab.gallery.buttons) == k
    assert "attention weight" in tab.gallery.buttons[0].toolTip()
    assert len(tab.gallery.thumbnails_shown) == k  # read inline on the synchronous path
    # clicking a gallery tile centres the view on it
    qtbot.mouseClick(tab.gallery.buttons[2], Qt.MouseButton.LeftButton)
    np.testing.assert_allclose(
        viewer_camera(viewer).center[-2:], tile_world_centre(session, int(top[2]))
    )

    # applying the same model to the same slide again: the kept result, no second run
    job_before = tab.job.state
    layer.data[rc[0, 0], rc[0, 1]] = -5.0
    assert tab.apply(session)
    assert tab.job.state == job_before
    assert layer.data[rc[0, 0], rc[0, 1]] == pytest.approx(expected[0])
    # the panel says what the heatmap and the gallery show
    assert "attention rank" in tab.status.text() and "softmax" in tab.status.text()


def test_apply_runs_in_a_worker_and_the_viewer_gets_the_layer(
    embedded: Any, trained: SlideModel, tmp_path: Path, qtbot: Any
) -> None:
    viewer, dock, session = embedded
    tab = dock.slide_model_tab
    assert tab.load_model(_save(trained, tmp_path, "threaded"))  # threaded
    qtbot.waitUntil(lambda: ov.find(viewer, ov.ATTENTION, session) is not None, timeout=60_000)
    qtbot.waitUntil(lambda: not tab.job.running and not tab.thumbs.running, timeout=60_000)
    assert tab.job.state == "done"
    assert tab.answer_label.text().startswith("Prediction: ")


def test_a_survival_model_shows_its_risk_and_what_it_means(
    embedded: Any, trained: SlideModel, tmp_path: Path
) -> None:
    _viewer, dock, session = embedded
    tab = dock.slide_model_tab
    rng = np.random.default_rng(3)
    state = {k: v.copy() for k, v in trained.state.items()}
    state["classifier.weight"] = rng.normal(size=(4, CONFIG.hidden)).astype(np.float32)
    state["classifier.bias"] = rng.normal(size=4).astype(np.float32)
    edges = [0.0, 12.5, 30.0, 55.0, 121.0]
    path = _save(
        trained, tmp_path, "survival", task="survival", state=state, class_names=[],
        bin_edges=edges,
    )  # fmt: skip
    assert tab.load_model(path, sync=True)
    ref = apply_slide_model(SlideModel.load(path), session.features)
    text = tab.answer_label.text()
    assert text.startswith(f"Risk score {ref.risk:.3f}: higher = worse")
    assert "from -4 (lowest) to 0 (highest)" in text
    assert "bins end at 12.5, 30.0, 55.0, 121.0" in text
    for edge, s in zip(edges[1:], ref.survival, strict=True):
        assert f"S({edge:.1f}) {s:.2f}" in text
    assert "survival (risk over 4 time bins)" in tab.model_label.text()


@pytest.mark.parametrize(
    ("change", "differ"),
    [
        ({"encoder": "uni"}, "its encoder differ"),
        ({"weights_hash": "0" * 64}, "its weights differ"),
        (
            {"tiling": {"requested_mpp": 0.5, "tile_px": 224, "overlap_px": 0}},
            "its tile size differ",
        ),
        ({"tiling": {"requested_mpp": 1.0, "tile_px": 112, "overlap_px": 0}}, "its µm/px differ"),
        (
            {"tiling": {"requested_mpp": 0.5, "tile_px": 112, "overlap_px": 56}},
            "its overlap differ",
        ),
        ("wider", "its width differ"),  # same encoder name and tiling, 2 x D features
    ],
)
def test_a_model_of_other_features_is_refused_in_one_line(
    embedded: Any, trained: SlideModel, tmp_path: Path, notes: Any, change: Any, differ: str
) -> None:
    viewer, dock, session = embedded
    tab = dock.slide_model_tab
    good = _save(trained, tmp_path, "good")
    assert tab.load_model(good, sync=True)
    shown = ov.find(viewer, ov.ATTENTION, session).data.copy()
    before = notes()
    if change == "wider":
        state = dict(trained.state)
        state["fc.0.weight"] = np.concatenate([state["fc.0.weight"]] * 2, axis=1)
        change = {"embed_dim": 2 * trained.embed_dim, "state": state}
    assert not tab.load_model(_save(trained, tmp_path, "other", **change), sync=True)
    new = notes()[len(before) :]
    assert len(new) == 1 and "\n" not in new[0], new
    assert differ in new[0] and f"{session.name} was embedded with another encoder" in new[0]
    assert new[0].endswith("embed it with those")
    assert tab.loaded.path == good  # the model loaded before stays, with its result
    np.testing.assert_array_equal(ov.find(viewer, ov.ATTENTION, session).data, shown)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("probe", "is a gpfm linear probe (load it in the Probe tab), not a slide model"),
        ("random-safetensors", "is not a gpfm slide model"),
        ("text", "is not a gpfm slide model"),
        ("missing", "not found"),
        ("torch-pickle", "is not a gpfm slide model"),  # never unpickled
        ("truncated", "is not a gpfm slide model"),
    ],
)
def test_a_file_that_is_not_a_slide_model_is_refused_in_one_line(
    embedded: Any, trained: SlideModel, tmp_path: Path, notes: Any, kind: str, message: str
) -> None:
    from gpfm_core.analysis import LinearProbe

    viewer, dock, session = embedded
    tab = dock.slide_model_tab
    path = tmp_path / f"{kind}.safetensors"
    if kind == "probe":
        labels = np.full(session.n_tiles, -1)
        labels[:40], labels[40:80] = 0, 1
        probe = LinearProbe(encoder=session.encoder, weights_hash=session.weights_hash)
        probe.fit(session.features, labels, class_names=["a", "b"])
        probe.save(path)
    elif kind == "random-safetensors":
        rng = np.random.default_rng(0)
        save_file({"w": rng.normal(size=(8, 4)).astype(np.float32)}, str(path))
    elif kind == "text":
        path.write_text("not a model\n")
    elif kind == "torch-pickle":
        import torch

        torch.save({"fc.0.weight": torch.zeros(4, 4)}, path)
    elif kind == "truncated":
        data = _save(trained, tmp_path, "whole").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    assert not tab.load_model(path, sync=True)
    msgs = notes()
    assert len(msgs) == 1 and "\n" not in msgs[0] and message in msgs[0], msgs
    assert tab.loaded is None and ov.find(viewer, ov.ATTENTION, session) is None


def test_the_tab_shows_its_overlay_and_a_closed_slide_takes_it_along(
    embedded: Any, trained: SlideModel, tmp_path: Path
) -> None:
    viewer, dock, session = embedded
    tab = dock.slide_model_tab
    assert tab.load_model(_save(trained, tmp_path, "model"), sync=True)
    attention = ov.find(viewer, ov.ATTENTION, session)
    dock.tabs.setCurrentWidget(dock.embed_tab)
    dock.tabs.setCurrentWidget(tab)
    assert dock.tab_overlay() == ov.ATTENTION and attention.visible
    assert dock.toggle_overlay() is False and not attention.visible
    assert dock.toggle_overlay() is True and attention.visible
    viewer.layers.remove(viewer.layers[session.name])
    assert ov.find(viewer, ov.ATTENTION, session) is None
    assert tab.slide_combo.count() == 0
