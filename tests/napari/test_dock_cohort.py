"""Retrieve tab, "search the cohort": the gallery over a whole embedded cohort, real widgets.

The cohort is real: the CMU sample and three slides generated from the sample images
(:func:`gpfm_core.cohort.synth.write_slide_cohort`), embedded by ``gpfm embed`` with
tiny-vit at the dock tests' tiling (0.5 µm/px, 112 px), which indexes them as they finish.
The dock's own CMU session (embedded by the dock, the shared test cache) queries it.
Expected scores are computed here from the feature files, in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dock_support import (
    ENCODER,
    MPP,
    TILE_PX,
    click,
    make_dock,
    open_cohort_hit,
    open_slide_layer,
    tile_world_centre,
    unit,
)
from qtpy.QtCore import QSettings, Qt

from napari_gpfm._layers import viewer_camera
from napari_gpfm._widget import GpfmDock
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._cohort_search import remembered_folder

pytest_plugins = ["_dock_support"]

K = 30


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path, data_dir: Path) -> Path:
    """The cohort folder ``gpfm embed`` wrote: CMU + 3 generated slides, indexed."""
    from gpfm_core.cli import main
    from gpfm_core.cohort.synth import write_slide_cohort

    root = tmp_path_factory.mktemp("cohort")
    manifest = write_slide_cohort(
        root, n_slides=3, size=(1024, 768), include=[cmu_svs],
        sources=[cmu_svs, data_dir / "he_patch_1000.png"],
    )  # fmt: skip
    out = root / "cohort"
    args = ["embed", str(manifest), "--encoder", ENCODER, "--mpp", str(MPP), "--tile-px",
            str(TILE_PX), "--device", "cpu", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(autouse=True)
def settings_here(tmp_path: Path) -> Iterator[None]:
    """The remembered cohort folder goes to this test's folder, not the user's settings."""
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path))
    yield


def _cohort_features(cohort: Path) -> tuple[dict[str, Any], np.ndarray]:
    """slide id -> Embeddings of every feature file, and the cohort mean (float64)."""
    from gpfm_core.embed import load_embeddings

    embs = {}
    for f in sorted(cohort.rglob("*.h5")):
        e = load_embeddings(f)
        embs[str(e.attrs["slide_id"])] = e
    mean = np.concatenate([e.features for e in embs.values()]).astype(np.float64).mean(axis=0)
    return embs, mean


def _open_cmu(make_napari_viewer: Any, cmu_svs: Path, cmu_embeddings: Path) -> tuple:
    viewer = make_napari_viewer()
    open_slide_layer(viewer, cmu_svs)
    dock = make_dock(viewer, cmu_embeddings)
    session = dock.embed_tab.run(sync=True)
    assert session is not None
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    return viewer, dock, session


def test_cohort_gallery_scores_thumbnails_and_opening_a_hit(
    make_napari_viewer: Any, cmu_svs: Path, cmu_embeddings: Path, cohort: Path, qtbot: Any
) -> None:
    viewer, dock, cmu = _open_cmu(make_napari_viewer, cmu_svs, cmu_embeddings)
    tab = dock.retrieve_tab
    tab.k_spin.setValue(K)
    tab.set_cohort_folder(cohort)
    assert tab.cohort_mode and tab.cohort_check.isChecked()
    assert remembered_folder() == cohort

    from napari.utils import progress

    bars: list[str] = []  # progress bars opened meanwhile (a bar per click costs ~0.25 s)
    progress._all_instances.events.changed.connect(
        lambda e: bars.extend(str(p.desc) for p in e.added)
    )
    query = 100
    click(viewer, tile_world_centre(cmu, query))
    q = tab.last_cohort_query
    assert q is not None and len(tab.hits) == K
    # the scores: cosines centred on the cohort's mean, over every tile of every slide
    embs, mean = _cohort_features(cohort)
    assert sorted(tab.searched) == sorted(embs)
    direction = unit((cmu.features[query] - mean)[None])[0]
    ref = {}
    for sid, e in embs.items():
        s = unit(e.features - mean) @ direction
        for row, score in enumerate(s):
            if not (sid == cmu.key and np.array_equal(e.coords[row], cmu.coords[query])):
                ref[(sid, row)] = score  # the clicked tile itself is no hit
    got = [ref[(h.key, h.index)] for h in tab.hits]  # KeyError: the query came back
    # float16 copy in the index: scores within 3e-3, compared by score (near-ties may swap)
    np.testing.assert_allclose([h.score for h in tab.hits], got, atol=3e-3)
    np.testing.assert_allclose(got, sorted(ref.values(), reverse=True)[:K], atol=3e-3)
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(h.score for h in tab.hits))
    names = {sid: Path(e.path).stem for sid, e in embs.items()}
    assert all(h.from_cohort and h.name == names[h.key] for h in tab.hits)
    assert {h.key for h in tab.hits} - {cmu.key}, "only the query's own slide was found"
    assert "4 slides" in tab.status.text() and cohort.name in tab.status.text()
    # the clicked slide's heatmap is centred on the same cohort mean
    sim = ov.find(viewer, ov.SIMILARITY, cmu)
    rc = cmu.grid_rc
    np.testing.assert_allclose(
        sim.data[rc[:, 0], rc[:, 1]], unit(cmu.features - q.mean) @ q.direction, atol=1e-5
    )
    np.testing.assert_allclose(q.direction, direction, atol=2e-3)
    # thumbnails of every hit, read from the slide files (three of them not open)
    qtbot.waitUntil(lambda: len(tab.gallery.thumbnails_shown) == K, timeout=60_000)
    assert tab.gallery.thumbnails_missing == set()
    assert bars == []  # the thumbnails are read without a progress bar

    # a hit on a slide that is not open: opened through the reader, session from the
    # cohort's file, its heatmap for the same query, the view centred on the tile
    i = next(i for i, h in enumerate(tab.hits) if h.key != cmu.key)
    hit, other = open_cohort_hit(qtbot, viewer, dock, not_on=cmu.key)
    assert dock.store.active is other and dock.explore_tab.session is other
    other_sim = ov.find(viewer, ov.SIMILARITY, other)
    np.testing.assert_allclose(
        other_sim.data[other.grid_rc[:, 0], other.grid_rc[:, 1]],
        unit(other.features - q.mean) @ q.direction,
        atol=1e-5,
    )
    # clicking it again opens nothing more
    qtbot.mouseClick(tab.gallery.buttons[i], Qt.MouseButton.LeftButton)
    assert len([lay for lay in viewer.layers if lay.metadata.get("path") == hit.slide_path]) == 1
    # a hit on the clicked slide itself: only the view moves
    mine = next((h for h in tab.hits if h.key == cmu.key), None)
    if mine is not None:
        layers = len(viewer.layers)
        tab.go_to(mine)
        assert len(viewer.layers) == layers
        np.testing.assert_allclose(
            viewer_camera(viewer).center[-2:], tile_world_centre(cmu, mine.index), atol=1e-6
        )

    # back to the open slides: both open slides are searched, each centred on its own mean
    tab.cohort_check.setChecked(False)
    assert not tab.cohort_mode
    dock.set_active(cmu)
    click(viewer, tile_world_centre(cmu, query))
    assert tab.last_cohort_query is None
    assert not any(h.from_cohort for h in tab.hits) and set(tab.searched) == {cmu.key, other.key}
    cu = unit(cmu.features - cmu.features.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(sim.data[rc[:, 0], rc[:, 1]], cu @ cu[query], atol=1e-5)
    qtbot.waitUntil(lambda: not tab.thumbs.running, timeout=60_000)

    # a new dock starts with the folder remembered, searching the open slides
    again = GpfmDock(viewer)
    assert again.retrieve_tab.cohort.folder == cohort and not again.retrieve_tab.cohort_mode


def test_a_slide_embedded_otherwise_searches_the_open_slides_with_one_line(
    make_napari_viewer: Any, cmu_svs: Path, cohort: Path, tmp_path: Path, notes: Any
) -> None:
    viewer = make_napari_viewer()
    open_slide_layer(viewer, cmu_svs)
    dock = make_dock(viewer, tmp_path / "emb")
    dock.embed_tab.mpp_spin.setValue(2.0)  # another tiling than the cohort's
    session = dock.embed_tab.run(sync=True)
    assert session is not None
    tab = dock.retrieve_tab
    dock.tabs.setCurrentWidget(tab)
    tab.set_cohort_folder(cohort, remember=False)
    assert remembered_folder() is None
    click(viewer, tile_world_centre(session, 3))
    lines = [n for n in notes() if "cohort" in n]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "no index of" in lines[0] and "2 µm/px" in lines[0] and "0.5 µm/px" in lines[0]
    # the open slides were searched instead: heatmap and gallery as usual
    assert tab.hits and not any(h.from_cohort for h in tab.hits)
    assert tab.searched == [session.key] and ov.find(viewer, ov.SIMILARITY, session) is not None


def test_a_missing_slide_file_gives_a_placeholder_and_one_line(
    make_napari_viewer: Any, cmu_svs: Path, cmu_embeddings: Path, cohort: Path, qtbot: Any,
    notes: Any,
) -> None:  # fmt: skip
    from gpfm_core.cohort import CohortIndex, find_index

    viewer, dock, cmu = _open_cmu(make_napari_viewer, cmu_svs, cmu_embeddings)
    tab = dock.retrieve_tab
    tab.set_cohort_folder(cohort)
    k = int(tab.k_spin.value())
    idx = CohortIndex.open(find_index(cohort))
    gone = next(s for s in idx.slides if s.name == "cohort-2")
    # a query tile whose top k holds tiles of cohort-2 (found with the index itself)
    query = next(
        r
        for r in range(0, cmu.n_tiles, 5)
        if any(h.slide_id == gone.slide_id for h in idx.search(cmu.features[r], k))
    )
    moved = Path(gone.slide_path).with_suffix(".moved")
    Path(gone.slide_path).rename(moved)
    try:
        click(viewer, tile_world_centre(cmu, query))
        qtbot.waitUntil(lambda: len(tab.gallery.thumbnails_shown) == len(tab.hits), timeout=60_000)
        missing = {i for i, h in enumerate(tab.hits) if h.key == gone.slide_id}
        assert missing and tab.gallery.thumbnails_missing == missing
        i = min(missing)
        assert "no thumbnail" in tab.gallery.buttons[i].toolTip()
        layers = len(viewer.layers)
        before = len(notes())
        qtbot.mouseClick(tab.gallery.buttons[i], Qt.MouseButton.LeftButton)
        lines = notes()[before:]
        assert len(lines) == 1 and "cohort-2" in lines[0] and "missing" in lines[0], lines
        assert len(viewer.layers) == layers and dock.store.get(gone.slide_id) is None
    finally:
        moved.rename(gone.slide_path)
