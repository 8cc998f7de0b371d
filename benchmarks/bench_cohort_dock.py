"""Click -> cohort gallery shown in the dock, thumbnails included, over a large cohort index.

Run under ``xvfb-run`` (a real napari viewer and the real dock):
    xvfb-run -a .venv/bin/python benchmarks/bench_cohort_dock.py            # 1,000,000 tiles
    xvfb-run -a .venv/bin/python benchmarks/bench_cohort_dock.py --tiles 20000   # minutes
Options: --tiles (1000000), --slide-tiles (20000 tiles per feature file), --dim (1024),
--k (12, the dock's top k), --repeats (30), --workdir (default ``bench_out/cohort_dock``;
the cohort and its index are kept there and reused by a later run of the same size).

What it builds (once per size):

* ``tiles / slide-tiles`` feature files (float16, gpfm's layout, written by
  :func:`gpfm_core.cohort.synth.write_feature_file`) of features drawn by
  :func:`gpfm_core.cohort.synth.clustered_features` (200 tissue-type clusters);
* one real pyramidal slide (:func:`gpfm_core.synth.make_synthetic_slide`, mosaic of the
  sample images, 0.25 µm/px) hard-linked once per feature file, so every feature file
  names its own slide file and the thumbnails open one file per slide, as in an archive;
  each file's tiles lie on a grid covering that slide (a level-0 tile side of
  ``slide side / ceil(sqrt(slide-tiles))`` px, so a thumbnail decodes one to four JPEG
  tiles, as a 448 px tile read from a 4x level does);
* the cohort index over all files (:func:`gpfm_core.cohort.build_index`).

What it times: the first slide is opened through the plugin's reader and its features are
the dock's session; the Retrieve tab is put in "search the cohort" mode on the folder.
Each repeat clicks a random tile (the viewer's mouse callbacks, as a click on the canvas)
and runs the Qt event loop until every gallery button holds its thumbnail (read by the
dock's worker thread from the slide files): click -> gallery with thumbnails shown. Printed:
median and p95 of that, the search and heatmap parts (the dock's own ``last_timing``), how
many distinct slides the hits came from, and the machine.

Target (issue 11): click -> cohort gallery shown, thumbnails included, <= 300 ms (p95 over
repeats; 1,000,000 tiles x 1024-d). A shared, loaded machine is slower than an idle one.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGET_MS = 300.0
SLIDE_MPP = 0.25
SLIDE_PX = 6144  # level-0 side of the generated slide (a few seconds to write)

log = logging.getLogger("bench_cohort_dock")


def machine() -> str:
    """One line: CPU, cores, load, Python, platform."""
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as fh:  # Linux: the model name is more telling
        names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
    if names:
        cpu = names[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, load {load:.1f}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def build_cohort(work: Path, *, tiles: int, slide_tiles: int, dim: int) -> Path:
    """The cohort folder: feature files naming real slide files, and its index (reused)."""
    from gpfm_core.cohort import build_index
    from gpfm_core.cohort.synth import clustered_features, write_feature_file
    from gpfm_core.synth import make_synthetic_slide

    folder = work / f"cohort_{tiles}x{dim}_{slide_tiles}"
    feats_dir = folder / "features"
    done = folder / "built.txt"
    if done.is_file():
        log.warning("reusing %s", folder)
        return feats_dir
    if folder.exists():
        shutil.rmtree(folder)
    slides_dir = folder / "slides"
    slides_dir.mkdir(parents=True)
    data = Path(os.environ.get("GPFM_DATA_DIR", ROOT.parent / "shared" / "data"))
    sources = [p for p in (data / "he_patch_1000.png",) if p.is_file()] or None
    t0 = time.perf_counter()
    master = make_synthetic_slide(
        slides_dir / "master.tiff", width=SLIDE_PX, height=SLIDE_PX, mpp=SLIDE_MPP, tile=256,
        sources=sources, seed=0,
    )  # fmt: skip
    side = int(np.ceil(np.sqrt(slide_tiles)))
    ts = SLIDE_PX // side  # level-0 tile side: the grid covers the slide
    n_files = int(np.ceil(tiles / slide_tiles))
    for i in range(n_files):
        m = min(slide_tiles, tiles - i * slide_tiles)
        link = slides_dir / f"s{i:05d}.tiff"
        try:
            os.link(master, link)
        except OSError:  # another file system: a copy
            shutil.copyfile(master, link)
        cells = np.arange(m)
        coords = np.stack([cells % side, cells // side], axis=1).astype(np.int64) * ts
        x = clustered_features(m, dim, seed=i).astype(np.float16)
        write_feature_file(
            feats_dir / f"s{i:05d}.h5", x, slide_id=f"s{i:05d}", dtype="float16",
            tile_size_level0=ts, tile_px=ts // 2, mpp=2 * SLIDE_MPP, coords=coords,
            slide_path=link,
        )  # fmt: skip
    t1 = time.perf_counter()
    build_index(feats_dir)
    t2 = time.perf_counter()
    done.write_text(f"{tiles} tiles, {n_files} files\n")
    print(
        f"built: {n_files} feature files ({t1 - t0:.0f} s), index of {tiles} tiles ({t2 - t1:.0f} s)",
        flush=True,
    )
    return feats_dir


def _wait(app: Any, ready: Any, timeout_s: float = 30.0) -> None:
    end = time.perf_counter() + timeout_s
    while not ready():
        app.processEvents()
        if time.perf_counter() > end:
            raise TimeoutError("the gallery's thumbnails did not arrive")
        time.sleep(0.0005)  # let the worker thread run between event-loop turns
    app.processEvents()  # the last thumbnail painted


def main() -> None:
    """Build (or reuse) the cohort, click, and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--slide-tiles", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "cohort_dock")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    feats_dir = build_cohort(
        args.workdir, tiles=args.tiles, slide_tiles=args.slide_tiles, dim=args.dim
    )

    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks
    from qtpy.QtWidgets import QApplication

    import napari
    from gpfm_core.embed import load_embeddings
    from napari_gpfm._widget import GpfmDock
    from napari_gpfm._widget._session import SlideSession

    first = sorted(feats_dir.glob("*.h5"))[0]
    emb = load_embeddings(first)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    layers = viewer.open(str(emb.attrs["slide_path"]), plugin="napari-gpfm")
    session = SlideSession.from_embeddings(
        emb, key=str(emb.attrs["slide_id"]), name=layers[0].name,
        slide_path=emb.attrs["slide_path"], mpp=SLIDE_MPP, path=first,
    )  # fmt: skip
    dock = GpfmDock(viewer)
    viewer.window.add_dock_widget(dock, name="GPFM")
    dock.set_active(session)
    tab = dock.retrieve_tab
    dock.tabs.setCurrentWidget(tab)
    tab.k_spin.setValue(args.k)
    tab.set_cohort_folder(feats_dir, remember=False)
    app = QApplication.instance()

    def click(index: int) -> None:
        x, y = session.tile_center(index)
        pos = (y * SLIDE_MPP, x * SLIDE_MPP)
        for kind, fire in (("mouse_press", mouse_press_callbacks),
                           ("mouse_release", mouse_release_callbacks)):  # fmt: skip
            fire(viewer, read_only_mouse_event(type=kind, button=1, position=pos))

    def shown() -> bool:
        g = tab.gallery
        return len(g.thumbnails_shown) == len(tab.hits) and not tab.thumbs.running

    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    click(0)  # the first click opens the index and creates the layers: reported apart
    _wait(app, shown, timeout_s=600)
    first_ms = 1e3 * (time.perf_counter() - t0)
    total, search, layer, slides = [], [], [], []
    for q in rng.integers(0, session.n_tiles, size=args.repeats):
        t0 = time.perf_counter()
        click(int(q))
        _wait(app, shown)
        total.append(1e3 * (time.perf_counter() - t0))
        assert tab.last_cohort_query is not None and len(tab.hits) == args.k
        assert not tab.gallery.thumbnails_missing, "a thumbnail could not be read"
        search.append(tab.last_timing["search_ms"])
        layer.append(tab.last_timing["layer_ms"])
        slides.append(len({h.key for h in tab.hits}))
    idx = tab.last_cohort_query.index
    viewer.close()

    def p95(v: list[float]) -> float:
        return float(np.percentile(v, 95))

    print(f"machine: {machine()}")
    print(
        f"cohort index: {idx.n_tiles} tiles x {idx.dim}-d in {len(idx.slides)} slides; "
        f"top {args.k}, {args.repeats} clicks; hits from {statistics.median(slides):.0f} slides "
        f"(median)"
    )
    print(f"first click (index opened, layers created): {first_ms:.0f} ms")
    print("| step | median ms | p95 ms |")
    print("|---|---|---|")
    print(f"| cohort search (candidates + re-rank + query slide's scores) | "
          f"{statistics.median(search):.1f} | {p95(search):.1f} |")  # fmt: skip
    print(f"| heatmap + query outline | {statistics.median(layer):.1f} | {p95(layer):.1f} |")
    print(f"| click -> gallery shown, thumbnails included | {statistics.median(total):.1f} | "
          f"{p95(total):.1f} |")  # fmt: skip
    verdict = "meets" if p95(total) <= TARGET_MS else "misses"
    print(f"target: click -> gallery with thumbnails <= {TARGET_MS:.0f} ms (p95): {verdict} it")


if __name__ == "__main__":
    main()
