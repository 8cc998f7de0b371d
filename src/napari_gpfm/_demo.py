"""The ``napari-gpfm demo``: the sample slide with its tissue and tile-grid layers.

:func:`build_demo` fills a viewer and returns a :class:`DemoState` that later steps
(the dock, embedding overlays) extend; :func:`run_demo` is the console entry behind
``napari-gpfm demo [--out DIR] [--screenshot PATH]``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpfm_core.errors import GpfmError
from gpfm_core.slide import Slide

__all__ = ["DemoState", "add_analysis_dock", "build_demo", "run_demo"]

log = logging.getLogger(__name__)

#: Window size of the ``--screenshot`` render (width, height) in screen pixels.
SCREENSHOT_SIZE = (1400, 900)


@dataclass
class DemoState:
    """What :func:`build_demo` put in the viewer.

    Attributes
    ----------
    slide : Slide
        The open sample slide (closed when its layer is removed).
    slide_layer : napari.layers.Image
        Multiscale RGB layer in µm.
    tissue, grid
        ``TissueMask`` and ``TileGrid`` computed on the slide.
    tissue_layer, grid_layer
        Their napari layers.
    out_dir : pathlib.Path
        Folder for demo outputs (embeddings later).
    extras : dict
        Room for later demo steps (dock widget, embedding layers ...).
    """

    slide: Slide
    slide_layer: Any
    tissue: Any
    grid: Any
    tissue_layer: Any
    grid_layer: Any
    out_dir: Path
    extras: dict[str, Any] = field(default_factory=dict)


def build_demo(
    viewer: Any,
    *,
    out_dir: str | os.PathLike[str] = "demo_out",
    slide_path: str | os.PathLike[str] | None = None,
    tile_mpp: float | None = None,
    tile_px: int | None = None,
) -> DemoState:
    """Open the sample slide in ``viewer`` with tissue and tile-grid layers.

    Parameters
    ----------
    viewer
        A napari viewer.
    out_dir
        Output folder (created).
    slide_path
        Slide to show (default: the CMU-1 small region sample, found or downloaded).
    tile_mpp, tile_px
        Tile grid resolution (µm/px) and tile side (px); default: the default
        encoder's tiling, so the grid shown is the grid the dock embeds.

    Returns
    -------
    DemoState

    Raises
    ------
    GpfmError
        The sample cannot be found or the slide cannot be opened (one line).
    """
    from gpfm_core.slide import open_slide
    from napari_gpfm._layers import add_analysis_layers
    from napari_gpfm._reader import ensure_close_hook, slide_layer_data
    from napari_gpfm._sample import find_cmu_small_region
    from napari_gpfm._widget._slide_layers import own_grid_layer, own_tissue_layer

    if tile_mpp is None or tile_px is None:
        from gpfm_core.encoders import default_encoder_name, get_encoder_meta

        meta = get_encoder_meta(default_encoder_name())
        tile_mpp = meta.tile_mpp if tile_mpp is None else tile_mpp
        tile_px = meta.tile_px if tile_px is None else tile_px
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(slide_path) if slide_path is not None else find_cmu_small_region()
    slide = open_slide(path)
    ensure_close_hook(viewer)
    data, kwargs, _ = slide_layer_data(slide)
    slide_layer = viewer.add_image(data, **kwargs)
    tissue, grid, tissue_layer, grid_layer = add_analysis_layers(
        viewer, slide, tile_mpp=tile_mpp, tile_px=tile_px
    )
    # the dock's own naming and tags, as its "Tissue + grid" makes them (one set per slide)
    own_tissue_layer(tissue_layer, slide_id=slide.slide_id, slide_name=slide_layer.name)
    own_grid_layer(grid_layer, grid, slide_id=slide.slide_id, slide_name=slide_layer.name)
    viewer.layers.selection.active = tissue_layer
    scale_bar(viewer).visible = True
    viewer.reset_view()
    log.info("demo: %s, %d tiles", path.name, len(grid))
    return DemoState(
        slide=slide,
        slide_layer=slide_layer,
        tissue=tissue,
        grid=grid,
        tissue_layer=tissue_layer,
        grid_layer=grid_layer,
        out_dir=out,
    )


def scale_bar(viewer: Any) -> Any:
    """The viewer's scale bar overlay (``viewer.scale_bar`` is deprecated from napari 0.9)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    return overlays["scale_bar"] if overlays is not None else viewer.scale_bar


def add_analysis_dock(viewer: Any, state: DemoState, *, encoder: str | None = None) -> Any:
    """Add the GPFM dock and run its demo steps: embed, cluster, query, cohort, probe, slide model.

    The slide is embedded with ``encoder`` (default: :func:`default_encoder_name`, the
    shipped student when no GPFM weights are present) into ``state.out_dir/embeddings``,
    reusing that cache on later runs. The dock is stored in ``state.extras["dock"]`` and
    the slide's session in ``state.extras["session"]``.
    """
    from napari_gpfm._widget import GpfmDock
    from napari_gpfm._widget._demo_hook import populate_demo

    dock = GpfmDock(viewer)
    viewer.window.add_dock_widget(dock, name="GPFM slide analysis", area="right")
    dock.embed_tab.watch_tissue(state.slide.slide_id)  # its grid layer follows tissue edits
    session = populate_demo(
        viewer,
        dock,
        out_dir=state.out_dir / "embeddings",
        encoder=encoder,
        slide_layer=state.slide_layer.name,
    )
    state.extras.update(dock=dock, session=session)
    from napari_gpfm._demo_cohort import add_cohort_search  # the Retrieve tab's cohort search

    state.extras["cohort"] = add_cohort_search(
        dock, session, sample=state.slide.info.path, slides_dir=state.out_dir / "cohort"
    )
    print(
        f"napari-gpfm demo: {session.n_tiles} tiles embedded by {session.encoder!s}",
        flush=True,
    )
    from napari_gpfm._demo_slide_model import add_slide_model

    # the Slide model tab: a demo ABMIL model applied, its gpfm: attention layer made
    add_slide_model(dock, session, out_dir=state.out_dir, slide_path=state.slide.path)
    return dock


def run_demo(
    *,
    out_dir: str | os.PathLike[str] = "demo_out",
    screenshot: str | os.PathLike[str] | None = None,
    slide_path: str | os.PathLike[str] | None = None,
    analysis: bool = True,
    encoder: str | None = None,
) -> int:
    """Open napari with the demo; with ``screenshot`` render it to PNG and exit.

    With ``analysis`` (the default) the dock embeds the slide, clusters it, queries a preset
    tile and leaves the probe ready; one overlay is shown at a time (the Retrieve tab's
    similarity heatmap; the others are a click on their eye icon or tab away). The Retrieve
    tab searches a small cohort the demo makes (:mod:`napari_gpfm._demo_cohort`).

    Returns
    -------
    int
        Process exit status: 0 on success, 2 on a user error (printed as one line).
    """
    from napari_gpfm._sample import find_cmu_small_region

    try:  # fail fast, before a window opens, when the sample is not available
        path = Path(slide_path) if slide_path is not None else find_cmu_small_region()
    except GpfmError as exc:
        print(f"napari-gpfm demo: {exc}", flush=True)
        return 2

    import napari

    viewer = napari.Viewer(title="napari-gpfm demo", show=True)
    try:
        state = build_demo(viewer, out_dir=out_dir, slide_path=path)
        if analysis:
            add_analysis_dock(viewer, state, encoder=encoder)
    except GpfmError as exc:
        print(f"napari-gpfm demo: {exc}", flush=True)
        viewer.close()
        return 2
    if screenshot is None:
        napari.run()
        return 0
    viewer.window.resize(*SCREENSHOT_SIZE)
    _process_events()
    target = Path(screenshot)
    target.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(target), canvas_only=False, flash=False)
    viewer.close()
    print(f"screenshot written to {target}", flush=True)
    return 0


def _process_events() -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is not None:
        for _ in range(5):
            app.processEvents()
