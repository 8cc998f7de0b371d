"""``napari-gpfm demo`` applies a slide model: the demo's ABMIL model (trained once on the
library's carcinoma-share demo slides, at the session's encoder and tiling) answers in the
Slide model tab and leaves ``gpfm: attention`` with one rank per embedded tile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpfm_core.evaluation import SlideModel, apply_slide_model
from napari_gpfm._demo import add_analysis_dock, build_demo
from napari_gpfm._demo_slide_model import add_slide_model, demo_slide_model_path
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._slide_model_tab import attention_rank, read_slide_model

pytest_plugins = ["_dock_support"]


def test_demo_applies_its_slide_model_with_attention(
    make_napari_viewer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], notes: Any
) -> None:
    viewer = make_napari_viewer()
    state = build_demo(viewer, out_dir=tmp_path / "out")
    dock = add_analysis_dock(viewer, state)
    session, tab = state.extras["session"], dock.slide_model_tab
    assert [m for m in notes() if "Inconsistent units" not in m] == []  # napari's own warning

    # the model: the demo's file, made for this session's encoder, weights and tiling
    path = demo_slide_model_path(state.out_dir, session.encoder)
    assert path.is_file() and tab.loaded is not None and tab.loaded.path == path
    assert read_slide_model(path).key == session.feature_key
    model = SlideModel.load(path)
    assert model.class_names == ["low", "high"] and model.config.hidden == 512

    # the answer: the demo slide is skin without carcinoma -> "low", as the file says
    ref = apply_slide_model(model, session.features)
    assert ref.prediction == "low" and ref.probabilities[0] > 0.5
    text = tab.answer_label.text()
    assert text.startswith(f"Prediction: low (p = {ref.probabilities[0]:.2f}).")
    assert "slide model carcinoma-share: Prediction: low" in capsys.readouterr().out

    # gpfm: attention of the demo slide: one rank per embedded tile on its grid cell
    layer = ov.find(viewer, ov.ATTENTION, session)
    assert layer is not None and layer.name == "gpfm: attention (cmu_small_region)"
    n = session.n_tiles
    rc = session.grid_rc
    values = np.asarray(layer.data)[rc[:, 0], rc[:, 1]]
    assert values.shape == (n,) and n == len(state.grid)
    np.testing.assert_allclose(values, attention_rank(ref.attention), atol=1e-6)
    assert values.min() > 0 and values.max() == pytest.approx(1.0)
    assert (np.asarray(layer.data) >= 0).sum() == n  # cells without a tile stay transparent
    # the gallery: the most attended tiles, most attended first
    top = np.argsort(-ref.attention, kind="stable")[: tab.k_spin.value()]
    assert [h.index for h in tab.hits] == top.tolist()
    # one overlay at a time: the Retrieve tab's similarity stays shown, attention is hidden
    assert not layer.visible and ov.find(viewer, ov.SIMILARITY, session).visible

    # a second run only loads the model file
    stamp = path.stat().st_mtime_ns
    assert (
        add_slide_model(dock, session, out_dir=state.out_dir, slide_path=state.slide.path) == path
    )
    assert path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("no carcinoma image", "he_patch_1000.png is not in GPFM_DATA_DIR"),
        ("a foreign data folder", "is not empty and holds no demo data: choose a new or empty"),
    ],
)
def test_a_demo_without_its_slide_model_says_why_in_one_line(
    embedded: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, notes: Any, case: str, why: str,
) -> None:  # fmt: skip
    viewer, dock, session = embedded
    out = tmp_path / "o"
    if case == "no carcinoma image":
        monkeypatch.setenv("GPFM_DATA_DIR", str(tmp_path))
    else:  # a file of the user's where the demo would put its slides
        data = demo_slide_model_path(out, session.encoder).parent / "data_112px"
        data.mkdir(parents=True)
        (data / "mine.txt").write_text("keep me\n")
    got = add_slide_model(dock, session, out_dir=out, slide_path=session.slide_path)
    assert got is None and dock.slide_model_tab.loaded is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-gpfm demo: no slide model (")
    assert why in lines[0]
    assert ov.find(viewer, ov.ATTENTION, session) is None and notes() == []
    assert not demo_slide_model_path(out, session.encoder).exists()  # nothing half-made
    if case == "a foreign data folder":
        assert (data / "mine.txt").read_text() == "keep me\n"
