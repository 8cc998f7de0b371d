"""Dock responsiveness on a whole-slide-sized synthetic session (run under ``xvfb-run``).

100,000 tiles x 1024-d random features on a 400 x 250 tile grid (no slide file is read:
the session is built from arrays). Measured, median of ``--repeats`` runs:

* similarity of every tile to a query: centred cosine, as the dock computes it (features
  centred on the slide's mean and normalised once per session, then one matrix-vector
  product per query: O(N*D));
* click -> ``gpfm: similarity`` updated: the viewer mouse callback path (tile look-up,
  centred cosine, raster write in place, contrast from the slide's own range,
  ``layer.refresh()``, the query tile outlined), then also with the Qt event loop drained
  so vispy uploads and draws the texture;
* click on the slide in the Explore tab: scatter highlight + ``selected_label`` on
  ``gpfm: clusters``, and how many colormap events those clicks fired (must be 0).

Usage: ``xvfb-run -a python benchmarks/bench_dock.py [--tiles 100000] [--dim 1024]``.
Targets: click -> similarity <= 150 ms, cosine <= 30 ms.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger("bench_dock")


def _median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), max(times)


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks
    from qtpy.QtWidgets import QApplication

    import napari
    from napari_gpfm._widget import GpfmDock
    from napari_gpfm._widget import _overlays as ov
    from napari_gpfm._widget._session import SlideSession

    rng = np.random.default_rng(0)
    cols = 400
    rows = int(np.ceil(args.tiles / cols))
    stride, mpp = 448, 0.25
    cells = rng.choice(rows * cols, size=args.tiles, replace=False)
    cells.sort()
    grid_rc = np.stack([cells // cols, cells % cols], axis=1).astype(np.int64)
    coords = grid_rc[:, ::-1] * stride
    features = rng.standard_normal((args.tiles, args.dim), dtype=np.float32)
    session = SlideSession(
        key="synthetic", name="synthetic slide", slide_path=None, features=features, coords=coords,
        grid_rc=grid_rc, grid_shape=(rows, cols), stride=stride, tile_size=stride, mpp=(mpp, mpp),
    )  # fmt: skip

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    dock = GpfmDock(viewer)
    viewer.window.add_dock_widget(dock, name="GPFM")
    dock.set_active(session)
    app = QApplication.instance()

    def click(index: int) -> None:
        x, y = session.tile_center(index)
        pos = (y * mpp, x * mpp)
        mouse_press_callbacks(
            viewer, read_only_mouse_event(type="mouse_press", button=1, position=pos)
        )
        mouse_release_callbacks(
            viewer, read_only_mouse_event(type="mouse_release", button=1, position=pos)
        )

    queries = iter(rng.integers(0, args.tiles, size=10 * args.repeats + 10))
    rows_out: list[tuple[str, float, float, str]] = []

    # cosine only
    t0 = time.perf_counter()
    index = session.similarity_index()
    build_ms = 1e3 * (time.perf_counter() - t0)
    assert index.mean is not None  # centred, as in the Retrieve tab
    med, worst = _median_ms(
        lambda: index.query(index.direction(int(next(queries))), centred=True), args.repeats
    )
    rows_out.append(("centred cosine similarity, all tiles", med, worst, "<= 30 ms"))

    # retrieve: click -> similarity layer updated
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    click(0)  # first click creates the layer
    app.processEvents()
    med, worst = _median_ms(lambda: click(int(next(queries))), args.repeats)
    rows_out.append(("click -> similarity layer updated (callback)", med, worst, "<= 150 ms"))
    totals = [dock.retrieve_tab.last_timing["total_ms"]]
    med, worst = _median_ms(lambda: (click(int(next(queries))), app.processEvents()), args.repeats)
    rows_out.append(
        ("click -> similarity drawn (callback + Qt/vispy redraw)", med, worst, "<= 150 ms")
    )
    assert ov.find(viewer, ov.SIMILARITY, session).data.shape == (rows, cols)
    assert totals[0] > 0

    # explore: clusters shown once, then clicks must not rebuild the colormap
    session.umap = rng.standard_normal((args.tiles, 2)).astype(np.float32)
    session.clusters = rng.integers(1, 11, size=args.tiles).astype(np.int32)
    dock.explore_tab.session = session
    t0 = time.perf_counter()
    dock.explore_tab._show(session, new_colormap=True)
    app.processEvents()
    show_ms = 1e3 * (time.perf_counter() - t0)
    clusters = ov.find(viewer, ov.CLUSTERS, session)
    events: list[object] = []
    clusters.events.colormap.connect(events.append)
    dock.tabs.setCurrentWidget(dock.explore_tab)
    med, worst = _median_ms(lambda: (click(int(next(queries))), app.processEvents()), args.repeats)
    rows_out.append(
        ("explore click -> point + cluster highlighted (+ redraw)", med, worst, "< 100 ms")
    )

    print(
        f"\n{args.tiles:,} tiles x {args.dim}-d, grid {rows} x {cols}, {args.repeats} runs each\n"
    )
    print("| step | median ms | worst ms | target |")
    print("|---|---:|---:|---|")
    for name, m, w, target in rows_out:
        print(f"| {name} | {m:.1f} | {w:.1f} | {target} |")
    print(
        f"| build SimilarityIndex once (centre + normalise features) | {build_ms:.1f} | - | one-off |"
    )
    print(f"| show clusters + scatter once (colormap set) | {show_ms:.1f} | - | one-off |")
    print(
        f"\nclusters colormap events during {args.repeats} explore clicks: {len(events)} (expected 0)"
    )
    viewer.close()


if __name__ == "__main__":
    main()
