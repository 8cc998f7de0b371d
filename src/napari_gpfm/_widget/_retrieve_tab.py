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
worker after the heatmap is shown; a slide file that cannot be read gets a placeholder.

*Search the cohort* (:mod:`._cohort_search`): the gallery shows the top-k tiles of a whole
cohort folder (``gpfm embed --out COHORT``) instead of the open slides, from the cohort
index of the clicked slide's encoder, weights and tiling (a slide embedded otherwise gets
one notification line and the open slides are searched). Scores and heatmaps are then
centred on the cohort's mean. Clicking a hit whose slide is not open opens it through the
plugin's reader, loads its session from the cohort's feature file, shows its heatmap for
the same query and centres the view on the tile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from gpfm_core.analysis import neighbourhood_indices, top_k_multi
from gpfm_core.errors import GpfmError
from napari_gpfm._layers import viewer_camera
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._cohort_search import (
    CohortQuery,
    CohortSearch,
    remember_folder,
    remembered_folder,
    session_group,
)
from napari_gpfm._widget._gallery import THUMB_PX, Hit, TileGallery, elide_middle
from napari_gpfm._widget._session import SessionStore, SlideSession
from napari_gpfm._widget._workers import Job, Step

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

_FILL = -2.0  # below any cosine: drawn with the transparent bottom colour
QUERY = "gpfm: query"


def query_layer(viewer: Any) -> Any:
    """The ``gpfm: query (<slide>)`` outline of the last query (one per viewer), or None."""
    for layer in viewer.layers:
        if ov.info(layer).get("kind") == ov.kind_of(QUERY):
            return layer
    return None


#: (slide path, level-0 x, y, level-0 (width, height)) of one gallery tile
ThumbItem = tuple[str, int, int, tuple[int, int]]


def thumbnails_job(
    items: list[ThumbItem],
    *,
    cancel: threading.Event,
    generation: int = 0,
    latest: Callable[[], int] | None = None,
) -> Generator[Step, None, None]:
    """Worker body: read (slide path, x, y, (w, h) level-0 size) tiles; yields
    ``Step(payload=(generation, i, rgb, why))``, each a square image (a tile of a slide with
    non-square pixels is resampled to its true, square, aspect), or ``rgb`` None and ``why``
    one line when the slide cannot be read (missing, moved, unreadable): a placeholder.

    Stops early, without an error, once ``latest()`` names a newer query.
    """
    from PIL import Image as PILImage

    from gpfm_core.slide import open_slide

    slides: dict[str, Any] = {}
    failed: dict[str, str] = {}
    try:
        for i, (path, x, y, (w, h)) in enumerate(items):
            if cancel.is_set() or (latest is not None and latest() != generation):
                return
            rgb, why = None, failed.get(path, "")
            if not why:
                try:
                    slide = slides.get(path) or slides.setdefault(path, open_slide(path))
                    level = slide.best_level_for_downsample(max(min(w, h) / THUMB_PX, 1.0))
                    ds = float(slide.level_downsamples[level])
                    rw, rh = max(round(w / ds), 1), max(round(h / ds), 1)
                    rgb = slide.read_region((x, y), level, (rw, rh))
                    if rw != rh:
                        side = max(rw, rh)
                        rgb = np.asarray(PILImage.fromarray(rgb).resize((side, side)))
                except (GpfmError, OSError) as exc:  # a placeholder, not an error
                    why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    failed[path] = why
                    log.info("thumbnail of %s: %s", path, why)
            yield Step(i + 1, len(items), "thumbnails", (generation, i, rgb, why))
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
    """The Retrieve tab.

    Attributes
    ----------
    embed_tab : EmbedTab or None
        The dock's Embed tab (set by the dock): opening a cohort hit's slide loads its
        features through it, as *Load features…* does.
    cohort : CohortSearch
        The cohort folder searched in cohort mode.
    last_cohort_query : CohortQuery or None
        The last cohort search (its index, mean and direction).
    """

    def __init__(
        self, viewer: napari.Viewer, store: SessionStore, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.store = store
        self.embed_tab: Any = None
        self.hits: list[Hit] = []
        #: keys of the slides the last query searched
        self.searched: list[str] = []
        self.last_timing: dict[str, float] = {}
        self.cohort = CohortSearch(remembered_folder())
        self.last_cohort_query: CohortQuery | None = None
        self._thumb_gen = 0
        self._pending_thumbs: tuple[list[ThumbItem], bool] | None = None
        self.thumbs = Job(
            thumbnails_job, name="GPFM gallery", on_step=self._on_thumb, on_end=self._thumbs_ended,
            progress_bar=False,  # a bar per click costs more than reading the thumbnails
        )  # fmt: skip

        self.arm_btn = QPushButton("Query by click: on")
        self.arm_btn.setCheckable(True)
        self.arm_btn.setChecked(True)
        self.arm_btn.toggled.connect(
            lambda on: self.arm_btn.setText(f"Query by click: {'on' if on else 'off'}")
        )
        self.k_spin = QSpinBox(minimum=1, maximum=100, value=12)
        self.neigh_check = QCheckBox("average the 3×3 neighbourhood")
        self.cohort_check = QCheckBox("search the cohort")
        self.cohort_check.setToolTip(
            "show the top tiles of a whole cohort folder (gpfm embed --out FOLDER, indexed) "
            "instead of the open slides; the clicked slide must be embedded alike"
        )
        self.cohort_btn = QPushButton("Cohort folder…")
        self.cohort_label = QLabel()
        self.cohort_label.setWordWrap(False)
        cohort_row = QHBoxLayout()
        cohort_row.addWidget(self.cohort_check)
        cohort_row.addWidget(self.cohort_btn)
        self.gallery = TileGallery()
        self.status = QLabel("Embed a slide, then click on the tissue to find similar tiles.")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow(self.arm_btn)
        form.addRow("Top k", self.k_spin)
        form.addRow(self.neigh_check)
        form.addRow(cohort_row)
        form.addRow(self.cohort_label)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.gallery, 1)
        lay.addWidget(self.status)
        self.gallery.tile_clicked.connect(self.go_to)
        self.cohort_btn.clicked.connect(lambda: self._choose_cohort())
        self.cohort_check.toggled.connect(self._cohort_toggled)
        self._show_cohort_folder()

    @property
    def armed(self) -> bool:
        """Whether clicks on the slide run a query."""
        return self.arm_btn.isChecked()

    # ------------------------------------------------------------------ cohort mode
    @property
    def cohort_mode(self) -> bool:
        """Whether clicks search the cohort folder rather than the open slides."""
        return self.cohort_check.isChecked() and self.cohort.folder is not None

    def set_cohort_folder(
        self, folder: str | Path | None, *, search: bool = True, remember: bool = True
    ) -> None:
        """Search ``folder`` (a ``gpfm embed --out`` folder or any folder with a cohort index).

        Parameters
        ----------
        folder
            The cohort folder; None forgets it (the open slides are searched).
        search
            Turn the cohort mode on.
        remember
            Keep it as the folder a new dock starts with (the demo's own cohort is not).
        """
        self.cohort.set_folder(folder)
        if folder is not None and remember:
            remember_folder(folder)
        self._show_cohort_folder()
        with _blocked(self.cohort_check):
            self.cohort_check.setChecked(bool(search and folder is not None))

    def _show_cohort_folder(self) -> None:
        folder = self.cohort.folder
        if folder is None:
            self.cohort_label.setText("cohort: none chosen")
            self.cohort_label.setToolTip("")
        else:
            self.cohort_label.setText(
                "cohort: " + elide_middle(self.cohort_label, str(folder), 260)
            )
            self.cohort_label.setToolTip(str(folder))

    def _choose_cohort(self) -> bool:
        start = str(self.cohort.folder or Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Cohort folder (gpfm embed --out)", start)
        if folder:
            self.set_cohort_folder(folder)
        return bool(folder)

    def _cohort_toggled(self, on: bool) -> None:
        if on and self.cohort.folder is None and not self._choose_cohort():
            with _blocked(self.cohort_check):
                self.cohort_check.setChecked(False)

    # ------------------------------------------------------------------ query
    def query_tile(
        self, session: SlideSession, index: int, *, thumbnails: bool = True, sync: bool = False
    ) -> np.ndarray:
        """Query with tile ``index`` of ``session``; updates the heatmap and gallery.

        In cohort mode the gallery shows the cohort's top k (see :meth:`query_cohort`); a
        slide whose features do not fit the cohort is searched among the open slides, with
        one notification line.

        Returns
        -------
        numpy.ndarray
            (N,) float32 cosine similarity of the clicked slide's tiles.
        """
        if self.cohort_mode:
            try:
                return self.query_cohort(session, index, thumbnails=thumbnails, sync=sync)
            except GpfmError as exc:
                from napari_gpfm._notify import notify_warning

                notify_warning(f"cohort not searched: {exc}")
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
        self.last_cohort_query = None
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

    def query_cohort(
        self, session: SlideSession, index: int, *, thumbnails: bool = True, sync: bool = False
    ) -> np.ndarray:
        """Cohort mode: tile ``index`` of ``session`` against the whole cohort.

        The clicked slide's heatmap and the gallery's scores are cosines centred on the
        cohort mean; the gallery shows the index's top k (the clicked tile left out), with
        thumbnails read from the slide files in a worker.

        Returns
        -------
        numpy.ndarray
            (N,) float32 scores of the clicked slide's tiles.

        Raises
        ------
        GpfmError
            No index in the cohort folder for this slide's encoder, weights and tiling.
        """
        t0 = time.perf_counter()
        radius = 1 if self.neigh_check.isChecked() else 0
        query_tiles = neighbourhood_indices(index, session.grid_rc, radius=radius)
        k = int(self.k_spin.value())
        q = self.cohort.query(session, query_tiles, k=k, exclude_row=index)
        t1 = time.perf_counter()
        session.similarity = q.scores
        session.query_index = index
        self._show_heatmap(session, q.scores, query_tiles)
        self._mark_query(session, query_tiles)
        t2 = time.perf_counter()
        self.hits = [
            Hit(
                h.slide_id, h.slide_name, h.row, h.score, slide_path=h.slide_path,
                file=str(h.file), xy=(h.x, h.y), size=(h.tile_size_level0,) * 2,
            )
            for h in q.hits
        ]  # fmt: skip
        self.gallery.set_hits(self.hits)
        self.last_cohort_query = q
        self.searched = [s.slide_id for s in q.index.slides]
        self.last_timing = {
            "search_ms": 1e3 * (t1 - t0),
            "layer_ms": 1e3 * (t2 - t1),
            "total_ms": 1e3 * (time.perf_counter() - t0),
        }
        folder = self.cohort.folder.name if self.cohort.folder is not None else ""
        best = (
            f"best match {self.hits[0].score:.3f} in {self.hits[0].name}"
            if self.hits
            else "no hits"
        )
        self.status.setText(
            f"query: tile {index} of {session.name} against the cohort in {folder}/ "
            f"({len(q.index.slides)} slides, {q.index.n_tiles} tiles); {best} (centred on the "
            "cohort's mean tile). Click a tile to open its slide there."
        )
        if thumbnails and self.hits:
            self._load_thumbnails(sync=sync)
        return q.scores

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
        slide_layer = ov.find(self.viewer, session.name)
        scale, translate = ov.slide_placement(session, slide_layer)
        translate = translate + origin * scale
        name = ov.layer_name(QUERY, session.name)
        layer = query_layer(self.viewer)
        if layer is None:
            with ov.keep_active(self.viewer):
                layer = self.viewer.add_shapes(
                    [rect], shape_type="rectangle", name=name, edge_color="cyan",
                    face_color=[0, 0, 0, 0], edge_width=max(min(session.stride_xy) / 12, 2.0),
                    scale=scale, translate=translate, **ov.units_of(slide_layer),
                )  # fmt: skip
            layer.editable = False
        else:
            if not np.allclose(layer.data[0], rect):  # another size: neighbourhood, slide
                layer.data = [rect]
                layer.shape_type = ["rectangle"]
            if not np.allclose(layer.scale, scale):
                layer.scale = scale
            layer.translate = translate
            if layer.name != name:  # the query moved to another slide
                layer.name = name
            if not layer.visible:
                layer.visible = True
        # one outline for the whole viewer (one query at a time), owned by the queried slide
        want = {"kind": ov.kind_of(QUERY), **session.provenance()}
        if dict(ov.info(layer)) != want:
            ov.tag(layer, **want)

    def _load_thumbnails(self, *, sync: bool) -> None:
        items: list[ThumbItem] = []
        for hit in self.hits:
            if hit.from_cohort and hit.xy is not None and hit.size is not None:
                items.append((hit.slide_path, hit.xy[0], hit.xy[1], hit.size))
                continue
            s = self.store.get(hit.key)
            if s is None or s.slide_path is None:
                items.append(("", 0, 0, (1, 1)))  # keeps the rows aligned: a placeholder
                continue
            x, y = (int(v) for v in s.coords[hit.index])
            items.append((str(s.slide_path), x, y, s.tile_size_xy))
        self._thumb_gen += 1
        if self.thumbs.running:  # the previous query's reads stop at their next tile
            self._pending_thumbs = (items, sync)
            return
        self._start_thumbnails(items, sync)

    def _start_thumbnails(self, items: list[ThumbItem], sync: bool) -> None:
        gen = self._thumb_gen
        self.thumbs.start(items, sync=sync, generation=gen, latest=lambda: self._thumb_gen)

    def _thumbs_ended(self, _state: str) -> None:
        pending, self._pending_thumbs = self._pending_thumbs, None
        if pending is not None:
            self._start_thumbnails(*pending)

    def _on_thumb(self, step: Step) -> None:
        gen, i, rgb, why = step.payload
        if gen != self._thumb_gen:
            return  # an older query's tile
        with contextlib.suppress(RuntimeError):  # the dock was closed meanwhile
            self.gallery.set_thumbnail(i, rgb, why=why)

    # ------------------------------------------------------------------ navigation
    def go_to(self, hit: Hit) -> None:
        """Centre the view on a hit's tile and zoom so it fills about a quarter of the view.

        A cohort hit whose slide is not open is opened first (:meth:`open_hit`).
        """
        if hit.from_cohort:
            self.open_hit(hit)
            return
        session = self.store.get(hit.key)
        if session is None:
            return
        self._centre_on(session, hit.index)
        self.status.setText(f"{hit.name}: tile {hit.index}, similarity {hit.score:.3f}")

    def _centre_on(self, session: SlideSession, index: int) -> None:
        x, y = session.tile_center(index)
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

    def open_hit(self, hit: Hit) -> SlideSession | None:
        """Show a cohort hit: open its slide (through the plugin's reader) if it is not open,
        load its session from the cohort's feature file, show its heatmap for the same
        query and centre the view on the tile.

        Problems (a moved slide file, a feature file that does not fit the slide) are one
        notification line; nothing else changes.

        Returns
        -------
        SlideSession or None
            The hit's slide session, None when it could not be shown.
        """
        from napari_gpfm._notify import notify_warning

        q = self.last_cohort_query
        session = self.store.get(hit.key)
        try:
            if session is None or (q is not None and session_group(session) != q.index.group):
                # not open, or open with other features: the cohort's own file of the slide
                session = self._load_hit(hit)
        except GpfmError as exc:
            notify_warning(f"{hit.name}: {exc}")
            return None
        row = _row_of(session, hit)
        if row is None:
            notify_warning(f"{hit.name}: its open session has no tile at {hit.xy}")
            return None
        if q is not None and not _is_query_slide(session, q):
            scores = q.scores_of(session)
            session.similarity = scores
            self._show_heatmap(session, scores, np.empty(0, np.int64))
        elif q is not None:
            ov.show_only(self.viewer, session, ov.SIMILARITY)
        self._centre_on(session, row)
        self.status.setText(f"{hit.name}: tile {row}, similarity {hit.score:.3f} in the cohort")
        return session

    def _load_hit(self, hit: Hit) -> SlideSession:
        """Open the hit's slide in the viewer (unless open) and load its cohort features."""
        from napari_gpfm._widget._embed_tab import slide_ref

        if self.embed_tab is None:
            raise GpfmError("the dock has no Embed tab to load the slide's features with")
        ref = next((r for r in self.embed_tab.slide_refs() if r.slide_id == hit.key), None)
        if ref is None:
            path = Path(hit.slide_path) if hit.slide_path else None
            if path is None or not path.exists():
                raise GpfmError(
                    f"its slide file {hit.slide_path or '(not recorded)'} is missing: move it "
                    "back, or re-embed the cohort where the slides are now"
                )
            layers = self.viewer.open(str(path), plugin="napari-gpfm")
            ref = next((r for lay in layers if (r := slide_ref(lay)) is not None), None)
            if ref is None:
                raise GpfmError(f"{path.name} could not be opened as a slide")
        return self.embed_tab.load_features(hit.file, ref=ref)


def _row_of(session: SlideSession, hit: Hit) -> int | None:
    """The row of ``session`` holding a cohort hit's tile (rows differ when the session came
    from another file of the same slide)."""
    if hit.xy is None:
        return hit.index if 0 <= hit.index < session.n_tiles else None
    xy = np.asarray(hit.xy, dtype=np.int64)
    if 0 <= hit.index < session.n_tiles and np.array_equal(session.coords[hit.index], xy):
        return hit.index
    same = np.flatnonzero((session.coords == xy).all(axis=1))
    if same.size:
        return int(same[0])
    w, h = hit.size or session.tile_size_xy
    return session.tile_at(xy[0] + (w - 1) / 2, xy[1] + (h - 1) / 2)


def _is_query_slide(session: SlideSession, q: CohortQuery) -> bool:
    """Whether ``session`` is the slide the query was clicked on (its heatmap is shown)."""
    return session.similarity is q.scores


@contextlib.contextmanager
def _blocked(widget: QWidget) -> Any:
    """Change ``widget`` without firing its signals."""
    old = widget.blockSignals(True)
    try:
        yield
    finally:
        widget.blockSignals(old)
