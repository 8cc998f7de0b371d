"""The npe2 reader on real slides in real viewers, and on every kind of bad file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from napari_gpfm._reader import SLIDE_KEY, napari_get_reader, slide_for_layer

ROOT = Path(__file__).resolve().parents[2]


def test_manifest_is_valid_and_its_commands_import() -> None:
    from npe2 import PluginManifest

    mf = PluginManifest.from_file(ROOT / "napari.yaml")
    assert mf.name == "napari-gpfm"
    patterns = mf.contributions.readers[0].filename_patterns
    assert {"*.svs", "*.ndpi", "*.mrxs", "*.tiff", "*.png"} <= set(patterns)
    by_id = {c.id: c for c in mf.contributions.commands}
    for cid in ("napari-gpfm.get_reader", "napari-gpfm.sample_cmu"):
        assert callable(_resolve(by_id[cid].python_name))


def _resolve(python_name: str) -> object:
    import importlib

    mod, _, attr = python_name.partition(":")
    return getattr(importlib.import_module(mod), attr)


def test_open_cmu_gives_lazy_multiscale_layer_in_um(make_napari_viewer, cmu_svs: Path) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(cmu_svs), plugin="napari-gpfm")
    assert layer.multiscale and layer.rgb
    assert tuple(layer.contrast_limits) == (0, 255)
    np.testing.assert_allclose(layer.scale, [0.499, 0.499])
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert [tuple(s) for s in layer.level_shapes] == [(2967, 2220), (1484, 1110), (742, 555)]
    md = layer.metadata
    assert md["slide_id"] == md["slide_info"]["slide_id"] and len(md["slide_id"]) == 16
    assert md["path"] == str(cmu_svs.resolve())
    assert md["slide_info"]["level_dimensions"] == [[2220, 2967]]
    assert type(layer.data[0]).__module__.startswith("dask")
    # the coarsest level napari shows first holds real pixels (tissue, white background)
    overview = np.asarray(layer.data[-1])
    assert overview.shape == (742, 555, 3)
    assert overview.min() < 120 and np.median(overview) > 200


def test_png_without_mpp_opens_in_pixels_with_warning(
    make_napari_viewer, he_png: Path, notes: Callable[[], list[str]]
) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(he_png), plugin="napari-gpfm")
    np.testing.assert_allclose(layer.scale, [1.0, 1.0])
    assert [str(u) for u in layer.units] == ["pixel", "pixel"]
    assert layer.metadata["mpp"] is None
    warn = [m for m in notes() if "µm/px" in m]
    assert len(warn) == 1 and "he_patch_1000.png" in warn[0] and "\n" not in warn[0]
    # a one-level 1000 px image needs no extra level
    assert [tuple(s) for s in layer.level_shapes] == [(1000, 1000)]


def test_removing_layer_closes_slide_only_when_last_user_goes(
    make_napari_viewer, cmu_svs: Path
) -> None:
    from napari.layers import Layer

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(cmu_svs), plugin="napari-gpfm")
    slide = slide_for_layer(layer)
    assert slide is not None and not slide.closed
    data, state, kind = layer.as_layer_data_tuple()
    twin = viewer.add_layer(Layer.create(data, state, kind))  # e.g. Layers > Duplicate
    assert twin.metadata[SLIDE_KEY] == layer.metadata[SLIDE_KEY]
    viewer.layers.remove(layer)
    assert not slide.closed  # the duplicate still shows it
    viewer.layers.remove(twin)
    assert slide.closed
    assert slide_for_layer(twin) is None


BAD = [
    ("missing", "does not exist"),
    ("text_svs", "not a readable .svs"),
    ("empty_svs", "empty"),
    ("truncated_svs", "truncated"),
    ("unsupported", "unsupported format"),
    ("garbage_tif", "truncated or corrupt"),
]


@pytest.mark.parametrize(("kind", "phrase"), BAD)
def test_bad_file_gives_none_and_one_notification(
    make_napari_viewer,
    bad_slides: dict[str, Path],
    notes: Callable[[], list[str]],
    kind: str,
    phrase: str,
) -> None:
    viewer = make_napari_viewer()
    path = bad_slides[kind]
    assert napari_get_reader(str(path)) is None
    msgs = notes()
    assert len(msgs) == 1, msgs
    assert path.name in msgs[0] and phrase in msgs[0] and "\n" not in msgs[0]
    assert "Traceback" not in msgs[0]
    assert len(viewer.layers) == 0
    viewer.add_image(np.zeros((4, 4), np.uint8))  # the viewer is alive and usable
    assert len(viewer.layers) == 1


def test_reader_declines_non_paths_silently(notes: Callable[[], list[str]]) -> None:
    assert napari_get_reader(["a.svs", "b.svs"]) is None
    assert napari_get_reader(42) is None  # type: ignore[arg-type]
    assert notes() == []


def test_viewer_open_of_broken_slide_raises_no_traceback_into_layers(
    make_napari_viewer, bad_slides: dict[str, Path], notes: Callable[[], list[str]]
) -> None:
    # napari's File > Open turns npe2's "refused the file" into its own notice; our line
    # says why, and the viewer keeps working
    viewer = make_napari_viewer()
    with pytest.raises(ValueError, match="napari-gpfm"):
        viewer.open(str(bad_slides["text_svs"]), plugin="napari-gpfm")
    assert any("notes.svs" in m for m in notes())
    assert len(viewer.layers) == 0
