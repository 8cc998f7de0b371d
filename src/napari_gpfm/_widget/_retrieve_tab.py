"""Retrieve tab: click a tile -> similarity heatmap + top-k gallery over all slides.

Scores are centred cosine similarities: each slide's features are centred on that slide's
mean and normalised once per session (:class:`~gpfm_core.analysis.similarity.SimilarityIndex`
with ``center=True``), so a score says how much a tile shares the query's departure from
the slide's average tissue (raw cosine of embeddings is 0.98-0.999 for every tile). The
query direction (one tile, or its 3x3 neighbourhood averaged) is compared with every tile
of every slide embedded with the same features: one matrix-vector product per slide.
The clicked slide's scores are written into a cached raster and ``gpfm: similarity`` is
updated in place (colormap ``magma`` with transparent bottom, opacity 0.6; contrast from
the slide's 2nd percentile to its best score other than the query tiles, so the slide's
own range fills the colormap; the user may change all three). The query tile is outlined
on the slide (``gpfm: query``). Gallery thumbnails are read from the slide files in a
worker after the heatmap is shown.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from gpfm_core.analysis import neighbourhood_indices, top_k_multi
from napari_gpfm._layers import viewer_camera
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._gallery import THUMB_PX, Hit, TileGallery
from napari_gpfm._widget._session import SessionStore, SlideSession
from napari_gpfm._widget._workers import Job, Step

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

_FILL = -2.0  # below any cosine: drawn with the transparent bottom colour
QUERY = "gpfm: query"


def thumbnails_job(
    items: list[tuple[str, int, int, tuple[int, int]]], *, cancel: threading.Event
) -> Generator[Step, None, None]:
    """Worker body: read (slide path, x, y, (w, h) level-0 size) tiles; yields
    ``Step(payload=(i, rgb))``, each a square image (a tile of a slide with non-square
    pixels is resampled to its true, square, aspect)."""
    from PIL import Image as PILImage

    from gpfm_core.slide import open_slide

    slides: dict[str, Any] = {}
    try:
        for i, (path, x, y, (w, h)) in enumerate(items):
            if cancel.is_set():
                return
            slide = slides.get(path) or slides.setdefault(path, open_slide(path))
            level = slide.best_level_for_downsample(max(min(w, h) / THUMB_PX, 1.0))
            ds = float(slide.level_downsamples[level])
            rw, rh = max(round(w / ds), 1), max(round(h / ds), 1)
            rgb = slide.read_region((x, y), level, (rw, rh))
            if rw != rh:
                side = max(rw, rh)
                rgb = np.asarray(PILImage.fromarray(rgb).resize((side, side)))
            yield Step(i + 1, len(items), "thumbnails", (i, rgb))
    finally:
        for s in slides.values():
            s.close()


def heatmap_limits(scores: np.ndarray, query: np.ndarray) -> tuple[float, float]:
    """Contrast limits spreading a slide's own range: its 2nd percentile to its best tile.

    The query tiles (which score ~1) are left out of the top, so the slide's best matches
    reach the top of the colormap.
    """
    rest = np.delete(np.asarray(scores, dtype=np.float32), np.asarray(query, dtype=np.int64))
    rest = rest[np.isfinite(rest)]
    if rest.size < 2:
        return -1.0, 1.0
    lo, hi = float(np.percentile(rest, 2)), float(rest.max())
    return (lo, hi) if hi > lo else (lo - 1e-3, lo + 1e-3)


def query_outline(session: SlideSession, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The query tiles' outline: level-0 ``(row, col)`` origin and a (4, 2) rectangle from it.

    The rectangle covers the tiles' pixels (pixel-centre coordinates, so from -0.5 to the
    extent - 0.5) relative to the origin, the top-left tile corner.
    """
    xy = session.coords[np.asarray(query, dtype=np.int64)]
    lo, hi = xy.min(axis=0), xy.max(axis=0) + np.asarray(session.tile_size_xy)
    h, w = float(hi[1] - lo[1]), float(hi[0] - lo[0])
    rect = np.array([[0, 0], [0, w], [h, w], [h, 0]], dtype=np.float64) - 0.5
    return np.array([lo[1], lo[0]], dtype=np.float64), rect


class RetrieveTab(QWidget):
    """The Retrieve tab."""

    def __init__(
        self, viewer: napari.Viewer, store: SessionStore, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.store = store
        self.hits: list[Hit] = []
        #: keys of the slides the last query searched
        self.searched: list[str] = []
        self.last_timing: dict[str, float] = {}
        self.thumbs = Job(thumbnails_job, name="GPFM gallery", on_step=self._on_thumb)

        self.arm_btn = QPushButton("Query by click: on")
        self.arm_btn.setCheckable(True)
        self.arm_btn.setChecked(True)
        self.arm_btn.toggled.connect(
            lambda on: self.arm_btn.setText(f"Query by click: {'on' if on else 'off'}")
        )
        self.k_spin = QSpinBox(minimum=1, maximum=100, value=12)
        self.neigh_check = QCheckBox("average the 3×3 neighbourhood")
        self.gallery = TileGallery()
        self.status = QLabel("Embed a slide, then click on the tissue to find similar tiles.")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow(self.arm_btn)
        form.addRow("Top k", self.k_spin)
        form.addRow(self.neigh_check)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.gallery, 1)
        lay.addWidget(self.status)
        self.gallery.tile_clicked.connect(self.go_to)

    @property
    def armed(self) -> bool:
        """Whether clicks on the slide run a query."""
        return self.arm_btn.isChecked()

    # ------------------------------------------------------------------ query
    def query_tile(
        self, session: SlideSession, index: int, *, thumbnails: bool = True, sync: bool = False
    ) -> np.ndarray:
        """Query with tile ``index`` of ``session``; updates the heatmap and gallery.

        Returns
        -------
        numpy.ndarray
            (N,) float32 cosine similarity of the clicked slide's tiles.
        """
        t0 = time.perf_counter()
        index_obj = session.similarity_index()
        radius = 1 if self.neigh_check.isChecked() else 0
        query_tiles = neighbourhood_indices(index, session.grid_rc, radius=radius)
        direction = index_obj.direction(query_tiles)  # in the slide's centred space
        scores_by: dict[str, np.ndarray] = {}
        # only slides embedded with the same encoder, weights and tiling are comparable
        searched, skipped = self.store.split_comparable(session)
        for other in searched:
            # every slide is centred on its own mean: the query is a direction, not centred again
            scores = other.similarity_index().query(direction, centred=True)
            other.similarity = scores
            scores_by[other.key] = scores
        t1 = time.perf_counter()
        session.query_index = index
        self._show_heatmap(session, scores_by[session.key], query_tiles)
        self._mark_query(session, query_tiles)
        t2 = time.perf_counter()
        ranked = {k: v.copy() for k, v in scores_by.items()}
        ranked[session.key][index] = np.nan  # the query itself is not a hit
        k = int(self.k_spin.value())
        self.hits = [
            Hit(key, s.name, i, sc)
            for key, i, sc in top_k_multi(ranked, k)
            if (s := self.store.get(key)) is not None
        ]
        self.gallery.set_hits(self.hits)
        self.last_timing = {
            "cosine_ms": 1e3 * (t1 - t0),
            "layer_ms": 1e3 * (t2 - t1),
            "total_ms": 1e3 * (time.perf_counter() - t0),
        }
        msg = (
            f"query: tile {index} of {session.name}; best match {self.hits[0].score:.3f} "
            "(centred cosine: 0 = like the slide's average tile, 1 = like the query)"
            if self.hits
            else "no hits"
        )
        msg += ". Searched: " + ", ".join(s.name for s in searched)
        if skipped:
            msg += "; not searched (another encoder, weights or tiling): " + ", ".join(
                s.name for s in skipped
            )
        self.searched = [s.key for s in searched]
        self.status.setText(msg)
        if thumbnails and self.hits:
            self._load_thumbnails(sync=sync)
        return scores_by[session.key]

    def _show_heatmap(self, session: SlideSession, scores: np.ndarray, query: np.ndarray) -> None:
        raster = session.cache.get("sim_raster")
        if raster is None:
            raster = session.cache["sim_raster"] = np.full(session.grid_shape, _FILL, np.float32)
        session.fill_raster(raster, scores)
        lo, hi = heatmap_limits(scores, query)
        ov.upsert_image(
            self.viewer, ov.SIMILARITY, raster, session, ov.find(self.viewer, session.name),
            colormap="magma", contrast_limits=(lo, hi), opacity=0.6, contrast_range=(-1.0, 1.0),
            values=scores,
        )  # fmt: skip
        ov.show_only(self.viewer, session, ov.SIMILARITY)  # a query shows its answer alone
        tiles = ov.find(self.viewer, ov.TILES, session)
        if tiles is not None and len(tiles.data) == session.n_tiles:
            tiles.features["similarity"] = scores

    def _mark_query(self, session: SlideSession, query: np.ndarray) -> None:
        """Outline the query tile(s) on the slide: ``gpfm: query``, one rectangle.

        The rectangle is drawn once at the origin and moved by the layer's translate: a
        click changes a transform (cheap), not the Shapes data (re-triangulated by napari,
        ~20 ms a click).
        """
        origin, rect = query_outline(session, query)
        scale, translate = ov.slide_placement(session, ov.find(self.viewer, session.name))
        translate = translate + origin * scale
        layer = ov.find(self.viewer, QUERY)
        if layer is None:
            with ov.keep_active(self.viewer):
                layer = self.viewer.add_shapes(
                    [rect], shape_type="rectangle", name=QUERY, edge_color="cyan",
                    face_color=[0, 0, 0, 0], edge_width=max(min(session.stride_xy) / 12, 2.0),
                    scale=scale, translate=translate,
                )  # fmt: skip
            layer.editable = False
        else:
            if not np.allclose(layer.data[0], rect):  # another size: neighbourhood, slide
                layer.data = [rect]
                layer.shape_type = ["rectangle"]
            if not np.allclose(layer.scale, scale):
                layer.scale = scale
            layer.translate = translate
            if not layer.visible:
                layer.visible = True
        layer.metadata["gpfm"] = {"slide_id": session.key, "kind": "query"}

    def _load_thumbnails(self, *, sync: bool) -> None:
        self.thumbs.cancel()
        items = []
        for hit in self.hits:
            s = self.store.get(hit.key)
            if s is None or s.slide_path is None:
                continue
            x, y = (int(v) for v in s.coords[hit.index])
            items.append((str(s.slide_path), x, y, s.tile_size_xy))
        if items and not self.thumbs.running:
            self.thumbs.start(items, sync=sync)

    def _on_thumb(self, step: Step) -> None:
        i, rgb = step.payload
        with contextlib.suppress(RuntimeError):  # the dock was closed meanwhile
            self.gallery.set_thumbnail(i, rgb)

    # ------------------------------------------------------------------ navigation
    def go_to(self, hit: Hit) -> None:
        """Centre the view on a hit's tile and zoom so it fills about a quarter of the view."""
        session = self.store.get(hit.key)
        if session is None:
            return
        x, y = session.tile_center(hit.index)
        slide_layer = ov.find(self.viewer, session.name)
        offset = (
            np.zeros(2) if slide_layer is None else np.asarray(slide_layer.translate, float)[-2:]
        )
        wy, wx = y * session.mpp[1] + offset[0], x * session.mpp[0] + offset[1]
        viewer_camera(self.viewer).center = (wy, wx)
        canvas = getattr(getattr(self.viewer, "canvas", None), "size", (600, 600))
        width = float(min(canvas))
        viewer_camera(self.viewer).zoom = width / (4.0 * session.tile_size * session.mpp[0])
        if slide_layer is not None:
            self.viewer.layers.selection.active = slide_layer
        self.status.setText(f"{hit.name}: tile {hit.index}, similarity {hit.score:.3f}")
