"""Explore tab: PCA -> UMAP and clustering, shown on the slide and in a scatter panel.

Clusters are numbered from 1 everywhere (UI, the slide's ``gpfm: clusters (<slide>)`` label
values, the ``cluster`` column of its ``gpfm: tiles``); 0 means "no tile" or HDBSCAN noise.
Hovering the slide shows the cluster through napari's own Labels status. The clusters
colormap is set once per clustering; a click only moves ``selected_label`` and the scatter
highlight. Scatter lasso / box selections paint ``gpfm: selection (<slide>)``.

Cancel stops the job between PCA, UMAP and clustering, and inside UMAP's layout after the
current epoch (:func:`~gpfm_core.analysis.umap_embed`'s ``cancel``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Labels
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from gpfm_core.errors import GpfmError
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._scatter import ScatterPlot
from napari_gpfm._widget._session import SessionStore, SlideSession
from napari_gpfm._widget._workers import Job, Step

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

KMEANS = "k-means"
HDBSCAN = "HDBSCAN (density)"
NOISE_RGBA = (0.55, 0.55, 0.55, 0.6)


def explore_job(
    session: SlideSession, method: str, k: int, *, cancel: threading.Event
) -> Generator[Step, None, tuple[SlideSession, np.ndarray, np.ndarray]]:
    """Worker body: UMAP (cached per session) then clusters.

    Returns ``(session, umap (N, 2) float32, labels (N,) int32)``; labels -1 are noise;
    None when cancelled. ``session.cache["umap_epochs"]`` holds the layout epochs run.
    """
    from gpfm_core.analysis import density_clusters, kmeans_clusters, pca_reduce, umap_embed
    from gpfm_core.analysis.embedding import UmapCancelled

    stage: dict[str, Any] = {"name": "pca", "frac": 0.0}

    def report(name: str, frac: float) -> None:
        stage.update(name=name, frac=frac)

    if "pca" not in session.cache:
        yield Step(0, 100, "PCA")
        session.cache["pca"] = pca_reduce(session.features, n_components=50)
    if cancel.is_set():
        return None  # type: ignore[return-value]
    if session.umap is None:
        epochs: list[int] = []
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(
                umap_embed, session.cache["pca"], pca_dim=None, progress=report, cancel=cancel,
                epochs_run=epochs,
            )  # fmt: skip
            try:
                while not fut.done():
                    yield Step(10 + int(80 * float(stage["frac"])), 100, f"UMAP {stage['name']}")
                    time.sleep(0.1)
            finally:
                if not fut.done():  # the generator was closed early: stop the layout too
                    cancel.set()
            try:
                umap = fut.result()
            except UmapCancelled:
                return None  # type: ignore[return-value]
            finally:
                session.cache["umap_epochs"] = epochs[-1] if epochs else 0
    else:
        umap = session.umap
    if cancel.is_set():
        return None  # type: ignore[return-value]
    yield Step(90, 100, "clustering")
    if method == HDBSCAN:
        labels = density_clusters(umap)
    else:
        labels = kmeans_clusters(session.cache["pca"], min(int(k), session.n_tiles))
    if cancel.is_set():
        return None  # type: ignore[return-value]
    yield Step(100, 100, "done")
    return session, umap, labels


class ExploreTab(QWidget):
    """The Explore tab (UMAP, clusters, scatter <-> slide linking)."""

    def __init__(
        self, viewer: napari.Viewer, store: SessionStore, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.store = store
        self.session: SlideSession | None = None
        self.job = Job(
            explore_job,
            name="GPFM clusters",
            on_step=self._on_step,
            on_done=self._on_done,
            on_end=self._on_end,
        )
        self.colormap_sets = 0

        self.method_combo = QComboBox()
        self.method_combo.addItems([KMEANS, HDBSCAN])
        self.k_spin = QSpinBox(minimum=2, maximum=60, value=8)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["lasso", "box"])
        self.run_btn = QPushButton("Cluster")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.progress = QProgressBar()
        self.scatter = ScatterPlot()
        self.status = QLabel("Embed a slide first.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Method", self.method_combo)
        form.addRow("Clusters (k)", self.k_spin)
        form.addRow("Scatter select", self.mode_combo)
        row = QHBoxLayout()
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(row)
        lay.addWidget(self.progress)
        lay.addWidget(self.scatter, 1)
        lay.addWidget(self.status)

        self.run_btn.clicked.connect(lambda: self.run())
        self.cancel_btn.clicked.connect(self.job.cancel)
        self.method_combo.currentTextChanged.connect(lambda m: self.k_spin.setEnabled(m == KMEANS))
        self.mode_combo.currentTextChanged.connect(lambda m: setattr(self.scatter, "mode", m))
        self.scatter.selection_changed.connect(self.show_selection)

    # ------------------------------------------------------------------ run
    def set_session(self, session: SlideSession | None) -> None:
        """Show ``session`` (called when a slide is embedded or made active)."""
        self.session = session
        if session is None:
            self.scatter.clear()
            return
        if session.umap is not None and session.clusters is not None:
            self._show(session)
        else:
            self.scatter.clear()
            self.status.setText(f"{session.name}: {session.n_tiles} tiles. Press Cluster.")

    def run(self, *, sync: bool = False) -> bool:
        """Compute UMAP + clusters for the active slide (threaded unless ``sync``)."""
        if self.job.running:
            return False
        session = self.session or self.store.active
        if session is None:
            from napari.utils.notifications import show_warning

            show_warning("no embedded slide: embed a slide in the Embed tab first")
            return False
        if session.n_tiles < 5:
            from napari.utils.notifications import show_warning

            show_warning(f"{session.name} has only {session.n_tiles} tiles: too few to cluster")
            return False
        self.session = session
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setRange(0, 100)
        self.job.start(
            session, self.method_combo.currentText(), int(self.k_spin.value()), sync=sync
        )
        return self.job.state == "done" if sync else True

    def _on_step(self, step: Step) -> None:
        self.progress.setValue(step.done)
        self.status.setText(step.desc)

    def _on_done(self, result: tuple[SlideSession, np.ndarray, np.ndarray] | None) -> None:
        if result is None:
            return
        session, umap, labels = result  # the slide clustered, even if another became active
        session.umap = umap
        session.clusters = np.where(labels >= 0, labels + 1, 0).astype(np.int32)
        if session is self.session:
            self._show(session, new_colormap=True)
            ov.show_only(self.viewer, session, ov.CLUSTERS)

    def _on_end(self, state: str) -> None:
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        if state != "done":
            self.status.setText(f"Clustering {state}.")

    # ------------------------------------------------------------------ display
    def cluster_colors(self, session: SlideSession) -> np.ndarray:
        """(n_clusters, 4) RGBA of clusters 1..n."""
        n = (
            int(session.clusters.max())
            if session.clusters is not None and session.clusters.size
            else 0
        )
        return ov.palette(max(n, 1))

    def _slide_layer(self, session: SlideSession) -> Any:
        return ov.find(self.viewer, session.name)

    def _show(self, session: SlideSession, *, new_colormap: bool = False) -> None:
        assert session.clusters is not None and session.umap is not None
        colors = self.cluster_colors(session)
        slide_layer = self._slide_layer(session)
        raster = session.raster(session.clusters, fill=0, dtype=np.int32)
        existing = ov.find(self.viewer, ov.CLUSTERS, session)
        cmap = ov.label_colormap(colors) if new_colormap or existing is None else None
        if cmap is not None:
            self.colormap_sets += 1
        layer = ov.upsert_labels(
            self.viewer, ov.CLUSTERS, raster, session, slide_layer, colormap=cmap, opacity=0.45,
            values=session.clusters,
        )  # fmt: skip
        point_colors = np.empty((session.n_tiles, 4), np.float32)
        noise = session.clusters == 0
        point_colors[~noise] = colors[session.clusters[~noise] - 1]
        point_colors[noise] = NOISE_RGBA
        self.scatter.set_data(session.umap, point_colors)
        ov.upsert_tiles(
            self.viewer, session, slide_layer,
            {"cluster": session.clusters, "umap_x": session.umap[:, 0], "umap_y": session.umap[:, 1]},
        )  # fmt: skip
        if new_colormap:  # active -> napari's status bar shows the cluster under the cursor
            self.viewer.layers.selection.active = layer
        n = int(session.clusters.max())
        self.status.setText(
            f"{session.name}: {n} clusters over {session.n_tiles} tiles"
            + (f" ({int(noise.sum())} noise tiles unlabelled)" if noise.any() else "")
            + ". Lasso points in the scatter, or click a tile on the slide."
        )

    def show_selection(self, indices: np.ndarray) -> None:
        """Paint the tiles of scatter points ``indices`` on ``gpfm: selection``."""
        session = self.session
        if session is None:
            return
        key = "selection_raster"
        raster = session.cache.get(key)
        if raster is None or raster.shape != session.grid_shape:
            raster = session.cache[key] = np.zeros(session.grid_shape, np.uint8)
        raster[...] = 0
        idx = np.asarray(indices, dtype=np.int64)
        rc = session.grid_rc[idx]
        raster[rc[:, 0], rc[:, 1]] = 1
        chosen = np.zeros(session.n_tiles, np.uint8)
        chosen[idx] = 1
        new = ov.find(self.viewer, ov.SELECTION, session) is None
        cmap = ov.label_colormap(np.array([[1.0, 1.0, 0.0, 1.0]])) if new else None
        ov.upsert_labels(
            self.viewer,
            ov.SELECTION,
            raster,
            session,
            self._slide_layer(session),
            colormap=cmap,
            opacity=0.7,
            values=chosen,
        )
        self.status.setText(f"{idx.size} tiles selected.")

    def click_tile(self, session: SlideSession, index: int | None) -> None:
        """A click on the slide: highlight the tile's point and its cluster (no colormap change)."""
        if session is not self.session or session.clusters is None:
            return
        if index is None:
            self.scatter.highlight([])
            return
        self.scatter.highlight([index])
        cluster = int(session.clusters[index])
        layer = ov.find(self.viewer, ov.CLUSTERS, session)
        if isinstance(layer, Labels) and cluster > 0:  # tile boxes (a Shapes layer) have none
            layer.selected_label = cluster
        self.status.setText(f"tile {index}: cluster {cluster if cluster else 'noise'}")

    def cluster_of(self, session: SlideSession, index: int) -> int:
        """Cluster number (1-based; 0 noise) of tile ``index``."""
        if session.clusters is None:
            raise GpfmError("no clusters yet: press Cluster in the Explore tab")
        return int(session.clusters[index])
