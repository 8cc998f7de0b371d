"""Fill the dock for ``napari-gpfm demo``: embed, cluster, query and prepare the probe."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core.errors import GpfmError
from napari_gpfm._widget._session import SlideSession

if TYPE_CHECKING:
    from napari_gpfm._widget._dock import GpfmDock

log = logging.getLogger(__name__)


def populate_demo(
    viewer: Any,
    dock: GpfmDock,
    *,
    query_xy: tuple[float, float] | None = None,
    out_dir: str | Path | None = None,
    encoder: str | None = None,
    slide_layer: str | None = None,
    k: int = 6,
) -> SlideSession:
    """Run every dock step synchronously on the first slide in ``viewer``.

    Embeds the slide (reusing cached embeddings), clusters it (k-means, ``k``), shows the
    similarity heatmap and gallery for the tile under level-0 ``query_xy`` (default: the
    embedded tile nearest the tissue centroid), and leaves the Probe tab with its
    annotation layers ready and the Retrieve tab current.

    Parameters
    ----------
    viewer
        The napari viewer holding a slide layer from the napari-gpfm reader.
    dock
        The :class:`GpfmDock` added to ``viewer``.
    query_xy
        Level-0 ``(x, y)`` of the query point.
    out_dir
        Embeddings folder (default: the dock's).
    encoder
        Encoder name (default: the dock's default).
    slide_layer
        Name of the slide layer (default: the first one).
    k
        Number of clusters.

    Returns
    -------
    SlideSession
        The embedded slide's session.
    """
    tab = dock.embed_tab
    tab.refresh_slides()
    if slide_layer is not None:
        tab.slide_combo.setCurrentText(slide_layer)
    if tab.slide_combo.count() == 0:
        raise GpfmError("no slide layer in the viewer: open a slide before populating the demo")
    if out_dir is not None:
        tab.set_out_dir(out_dir)
    if encoder is not None:
        tab.encoder_combo.setCurrentText(encoder)
    session = tab.run(sync=True)
    if session is None:
        raise GpfmError("embedding the demo slide failed (see the notification)")
    dock.explore_tab.k_spin.setValue(k)
    dock.explore_tab.run(sync=True)
    if query_xy is None:
        centres = session.tile_centers()
        mid = centres.mean(axis=0)
        index = int(np.argmin(((centres - mid) ** 2).sum(axis=1)))
    else:
        from gpfm_core.analysis import query_from_point

        found = query_from_point(
            float(query_xy[0]), float(query_xy[1]), session.coords, session.tile_size_xy
        )
        if found is None:
            raise GpfmError(
                f"query point {query_xy} is not on an embedded tile: pick a point on tissue"
            )
        index = found
    dock.retrieve_tab.query_tile(session, index, sync=True)
    dock.probe_tab.set_session(session)
    dock.probe_tab.ensure_layers()
    dock.tabs.setCurrentWidget(dock.retrieve_tab)
    log.info("demo: %s, %d tiles, query tile %d", session.name, session.n_tiles, index)
    return session
