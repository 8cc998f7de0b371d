"""``make demo``'s cohort search: the demo makes, embeds and indexes a small cohort itself
(the sample slide and slides generated from it), the Retrieve tab searches it, and a hit
opens its slide. Real viewer, real slides, real tiny-vit, real index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _dock_support import open_cohort_hit
from qtpy.QtCore import QSettings

from napari_gpfm._demo import add_analysis_dock, build_demo
from napari_gpfm._widget import _overlays as ov

pytest_plugins = ["_dock_support"]


def test_demo_searches_its_own_cohort_opens_a_hit_and_a_second_start_reuses_it(
    make_napari_viewer: Any, tmp_path: Path, qtbot: Any
) -> None:
    from gpfm_core.cohort import find_index
    from napari_gpfm._demo_cohort import COHORT_SLIDES, add_cohort_search
    from napari_gpfm._widget._cohort_search import remembered_folder

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path))
    viewer = make_napari_viewer()
    state = build_demo(viewer, out_dir=tmp_path / "out")
    add_analysis_dock(viewer, state, encoder="tiny-vit")
    dock, session, run = (state.extras[k] for k in ("dock", "session", "cohort"))
    root = tmp_path / "out" / "embeddings"  # the dock's: the sample's file is reused
    assert dock.embed_tab.out_dir == root
    assert run.count("embedded") == COHORT_SLIDES and run.count("reused") == 1
    assert not run.failed and not run.index_errors
    assert session.embeddings_path in {r.file and Path(r.file) for r in run.reports}
    tab = dock.retrieve_tab
    assert tab.cohort_mode and tab.cohort.folder == root
    assert remembered_folder() is None  # the demo's cohort is not the user's choice
    q = tab.last_cohort_query
    assert q is not None and q.index.index_dir == find_index(root)
    names = sorted(s.name for s in q.index.slides)
    assert names == ["cmu_small_region"] + [f"cohort-{i + 1}" for i in range(COHORT_SLIDES)]
    assert q.index.n_tiles == sum(r.n_tiles for r in run.reports)
    # the gallery holds the cohort's top k, from more than one slide
    assert len(tab.hits) == tab.k_spin.value() and all(h.from_cohort for h in tab.hits)
    assert len({h.key for h in tab.hits}) > 1, [h.name for h in tab.hits]
    assert session.query_index is not None and dock.tabs.currentWidget() is tab
    assert ov.find(viewer, ov.SIMILARITY, session).visible
    qtbot.waitUntil(lambda: len(tab.gallery.thumbnails_shown) == len(tab.hits), timeout=60_000)
    assert tab.gallery.thumbnails_missing == set()

    # clicking a hit of a generated slide opens it, centred on the tile, with its heatmap
    hit, _ = open_cohort_hit(qtbot, viewer, dock, not_on=session.key)
    assert hit.name.startswith("cohort-")

    # the next start: no slide generated, embedded or indexed again, no file rewritten
    def stamps() -> dict[str, int]:
        return {
            p.relative_to(root).as_posix(): p.stat().st_mtime_ns
            for p in root.rglob("*")
            if p.is_file() and "reports" not in p.parts and p.suffix != ".lock"
        }

    before = stamps()
    again = add_cohort_search(
        dock, session, sample=state.slide.info.path, slides_dir=tmp_path / "out" / "cohort"
    )
    assert again.count("skipped") == COHORT_SLIDES + 1 and again.count("embedded") == 0
    assert stamps() == before
    qtbot.waitUntil(lambda: not tab.thumbs.running, timeout=60_000)
