"""Slide model tab: load a trained ABMIL model, apply it to an embedded slide, show its answer.

A slide model (:class:`gpfm_core.evaluation.SlideModel`, one ``.safetensors`` file written by
``gpfm eval`` or ``gpfm train-mil``) reads the tile features of a whole slide and gives one
answer: class probabilities, or a survival risk. The tab loads such a file, checks that it was
trained on features like the slide's (encoder, weights hash and tiling: the
:func:`~napari_gpfm._widget._session.feature_key` that probes are checked with) and applies
it in a worker (:func:`~gpfm_core.evaluation.mil.iter_apply_slide_model`, progress per chunk;
``precision="auto"``: int8 on CPU for large slides when it agrees with fp32 on the slide's
own tiles). It shows

* the answer: the predicted class with every class probability, or the risk score with what
  it means (its time bins; higher = earlier event) and the survival curve;
* ``gpfm: attention (<slide>)``: each tile's attention **rank** on this slide, from just
  above 0 (least attended) to 1 (most), CLAM's percentile heatmap. Raw scores differ in
  scale between slides and models and their softmax weights are concentrated on a few tiles,
  so ranks are what shows the pattern; the raw score and the softmax weight of every tile
  are in the ``gpfm: tiles`` layer's features (``attention``, ``attention_weight``);
* the most attended tiles in a gallery (with their softmax weight: their share of the
  pooled slide feature); a click centres the view on the tile.

Results are kept per (slide, model file): applying the same model to the same slide again
shows them at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from gpfm_core.errors import GpfmError
from napari_gpfm._layers import viewer_camera
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._gallery import Hit, TileGallery
from napari_gpfm._widget._retrieve_tab import thumbnails_job
from napari_gpfm._widget._session import SessionStore, SlideSession, feature_key, key_mismatch
from napari_gpfm._widget._workers import Job, Step, notify_error

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

#: Colormap of ``gpfm: attention`` (blue = least, red = most attended, as CLAM's heatmaps).
ATTENTION_CMAP = "turbo"
_FILL = -1.0  # cells without a tile: below the contrast range, drawn transparent


@dataclass(frozen=True)
class LoadedModel:
    """A slide model file read into the tab.

    Attributes
    ----------
    model
        The :class:`~gpfm_core.evaluation.SlideModel`.
    path
        Its file.
    sha
        SHA-256 of the file: results are kept per (slide, ``sha``).
    key
        :func:`~napari_gpfm._widget._session.feature_key` of the features it was trained on.
    """

    model: Any
    path: Path
    sha: str
    key: tuple[Any, ...]


@dataclass(frozen=True)
class SlideResult:
    """A slide model's answer on one slide, ready to show.

    Attributes
    ----------
    output
        The :class:`~gpfm_core.evaluation.SlideOutput`.
    rank
        (N,) float32 attention rank of each tile in (0, 1] (ties share their mean rank):
        what ``gpfm: attention`` shows.
    weight
        (N,) float32 softmax of the attention scores (sums to 1): each tile's share of the
        pooled slide feature.
    seconds
        Time the model took on the slide.
    """

    output: Any
    rank: np.ndarray
    weight: np.ndarray
    seconds: float


def model_key(model: Any) -> tuple[Any, ...]:
    """The :func:`feature_key` of the features ``model`` was trained on.

    ``gpfm eval`` records a missing weights hash as ``"unknown"``; sessions record it as
    ``""``: both mean "not recorded".
    """
    weights = model.weights_hash if model.weights_hash not in (None, "unknown") else ""
    return feature_key(model.encoder, weights, model.tiling, model.embed_dim)


def read_slide_model(path: str | Path) -> LoadedModel:
    """Read a slide model file (safetensors + JSON header; nothing is unpickled).

    Raises
    ------
    GpfmError
        Missing file, a probe file or any file that is not a slide model, a damaged one.
    """
    from gpfm_core.evaluation import SlideModel

    p = Path(path)
    model = SlideModel.load(p)
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    return LoadedModel(model, p, sha, model_key(model))


def attention_rank(attention: np.ndarray) -> np.ndarray:
    """(N,) float32 rank of each score divided by N, in (0, 1] (ties: their mean rank)."""
    from scipy.stats import rankdata

    a = np.asarray(attention, dtype=np.float64)
    return (rankdata(a, method="average") / max(a.size, 1)).astype(np.float32)


def attention_weight(attention: np.ndarray) -> np.ndarray:
    """(N,) float32 softmax of the attention scores: the model's pooling weights."""
    a = np.asarray(attention, dtype=np.float64)
    e = np.exp(a - a.max())
    return (e / e.sum()).astype(np.float32)


def apply_job(
    session: SlideSession, model: Any, sha: str, *, cancel: threading.Event,
    device: str | None = None, precision: str = "auto",
) -> Generator[Step, None, Any]:  # fmt: skip
    """Worker body: apply ``model`` (file hash ``sha``) to ``session``'s features chunk by chunk.

    ``precision`` as :func:`~gpfm_core.evaluation.mil.iter_apply_slide_model`'s (the tab:
    ``"auto"``). Returns ``(session, sha, SlideResult)``, or None when cancelled.
    """
    from gpfm_core.evaluation.mil import iter_apply_slide_model

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    gen = iter_apply_slide_model(model, session.features, precision=precision, device=device)
    while True:
        try:
            done, total = next(gen)
        except StopIteration as stop:
            out = stop.value
            break
        if cancel.is_set():
            gen.close()
            return None
        yield Step(done, total, "applying the slide model")
    seconds = time.perf_counter() - t0
    result = SlideResult(
        out, attention_rank(out.attention), attention_weight(out.attention), seconds
    )
    return session, sha, result


def model_text(loaded: LoadedModel) -> str:
    """The loaded model in one paragraph: task, classes or bins, features, training."""
    m = loaded.model
    t = m.training or {}
    what = t.get("task") or loaded.path.stem
    if m.task == "classification":
        kind = f"classification into {', '.join(m.class_names)}"
    else:
        kind = f"survival (risk over {m.n_out} time bins)"
    enc, weights, mpp, px, _overlap, dim = loaded.key
    made = (
        f"{enc or 'unknown encoder'} (weights {str(weights)[:8] or 'unknown'}), "
        f"{mpp or '?'} µm/px, {px or '?'} px tiles, {dim}-d"
    )
    trained = f"{t['epochs']} epochs" if "epochs" in t else "training not recorded"
    metrics = t.get("metrics") or {}
    if isinstance(metrics, dict) and metrics:
        split, values = next(iter(metrics.items()))
        shown = [
            f"{k} {v:.2f}"
            for k, v in values.items()
            if k in ("auroc_macro", "balanced_accuracy", "c_index") and isinstance(v, float)
        ]
        if shown:
            trained += f"; {split}: " + ", ".join(shown)
    return f"{loaded.path.name}: {what}, {kind}. Reads {made}. Trained: {trained}."


def answer_text(model: Any, out: Any) -> str:
    """The slide-level answer in words (plain text, one or two lines).

    Classification: ``"Prediction: high (p = 0.83). high 0.83 · low 0.17"`` (classes by
    probability). Survival: the risk, what it means, and the survival curve per time bin.
    """
    if model.task == "classification":
        p = np.asarray(out.probabilities, dtype=np.float64)
        best = int(np.argmax(p))
        order = np.argsort(-p, kind="stable")
        listed = " · ".join(f"{model.class_names[i]} {p[i]:.2f}" for i in order)
        return f"Prediction: {model.class_names[best]} (p = {p[best]:.2f}). {listed}"
    edges = np.asarray(model.bin_edges, dtype=np.float64)
    n = edges.size - 1
    bins = " · ".join(
        f"S({edges[i + 1]:.1f}) {s:.2f}" for i, s in enumerate(np.asarray(out.survival))
    )
    return (
        f"Risk score {out.risk:.3f}: higher = worse (an earlier event). The risk is minus the "
        f"sum of the survival curve over {n} time bins, from -{n} (lowest) to 0 (highest); "
        f"bins end at {', '.join(f'{e:.1f}' for e in edges[1:])} (the training times' unit). "
        f"Survival: {bins}"
    )


def centre_on_tile(viewer: Any, session: SlideSession, index: int) -> None:
    """Centre the view on tile ``index`` of ``session`` and zoom so it fills ~1/4 of the view."""
    x, y = session.tile_center(index)
    slide_layer = ov.find(viewer, session.name)
    offset = np.zeros(2) if slide_layer is None else np.asarray(slide_layer.translate, float)[-2:]
    camera = viewer_camera(viewer)
    camera.center = (y * session.mpp[1] + offset[0], x * session.mpp[0] + offset[1])
    canvas = getattr(getattr(viewer, "canvas", None), "size", (600, 600))
    camera.zoom = float(min(canvas)) / (4.0 * session.tile_size * session.mpp[0])
    if slide_layer is not None:
        viewer.layers.selection.active = slide_layer


class SlideModelTab(QWidget):
    """The Slide model tab (see the module docstring)."""

    def __init__(
        self, viewer: napari.Viewer, store: SessionStore, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.store = store
        self.session: SlideSession | None = None
        self.loaded: LoadedModel | None = None
        #: (slide key, model sha) of what the panel shows.
        self.shown: tuple[str, str] | None = None
        self.hits: list[Hit] = []
        self.device: str | None = None  # None: CUDA when available, else CPU
        self._sync = False  # thumbnails inline too (tests, the demo)
        self._pending: SlideSession | None = None
        self.job = Job(
            apply_job, name="GPFM slide model", on_done=self._on_done, on_end=self._on_end
        )
        self.thumbs = Job(
            thumbnails_job, name="GPFM gallery", on_step=self._on_thumb, progress_bar=False
        )

        self.load_btn = QPushButton("Load slide model…")
        self.load_btn.setToolTip(
            "A .safetensors model from gpfm eval (report/models/<task>/<encoder>/fold<k>) "
            "or gpfm train-mil"
        )
        self.model_label = QLabel("No slide model loaded.")
        self.model_label.setWordWrap(True)
        self.slide_combo = QComboBox()
        self.apply_btn = QPushButton("Apply")
        self.answer_label = QLabel("")
        self.answer_label.setWordWrap(True)
        self.answer_label.setStyleSheet("font-weight: bold")
        self.k_spin = QSpinBox(minimum=1, maximum=100, value=9)
        self.gallery = TileGallery(score_name="attention weight")
        self.status = QLabel(
            "Load a slide model trained on features of the encoder, weights and tiling the "
            "slide was embedded with."
        )
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.slide_combo, 1)
        row.addWidget(self.apply_btn)
        form = QFormLayout()
        form.addRow("Slide", row)
        form.addRow("Top tiles", self.k_spin)
        lay = QVBoxLayout(self)
        lay.addWidget(self.load_btn)
        lay.addWidget(self.model_label)
        lay.addLayout(form)
        lay.addWidget(self.answer_label)
        lay.addWidget(self.gallery, 1)
        lay.addWidget(self.status)

        self.load_btn.clicked.connect(self._load_dialog)
        self.apply_btn.clicked.connect(lambda: self._guard(self.apply))
        self.k_spin.valueChanged.connect(lambda _k: self._refresh_gallery())
        self.gallery.tile_clicked.connect(self.go_to)

    # ------------------------------------------------------------------ sessions
    def set_session(self, session: SlideSession | None) -> None:
        """Make ``session`` the slide the model applies to (listed first in the combo)."""
        self.session = session
        self.slide_combo.clear()
        self.slide_combo.addItems([s.name for s in self.store])
        if session is not None:
            self.slide_combo.setCurrentText(session.name)

    def selected(self) -> SlideSession | None:
        """The slide chosen in the combo (default: the active one)."""
        return self.store.by_name(self.slide_combo.currentText()) or self.session

    # ------------------------------------------------------------------ load / apply
    def load_model(self, path: str | Path, *, sync: bool = False) -> bool:
        """Read a slide model file and apply it to the chosen slide.

        A file that is not a slide model, or a model trained on other features than the
        chosen slide's (encoder, weights, tiling), is refused with one notification line,
        and the model loaded before stays. Without an embedded slide the model is kept
        until one is embedded.

        Returns
        -------
        bool
            Whether the model was taken.
        """
        try:
            loaded = read_slide_model(path)
            session = self.selected()
            if session is not None:
                self.check_fits(loaded, session)
        except GpfmError as exc:
            notify_error(exc)
            return False
        self.loaded = loaded
        self.model_label.setText(model_text(loaded))
        if session is None:
            self.status.setText("Model loaded: embed a slide in the Embed tab to apply it.")
            return True
        self.apply(session, sync=sync)
        return True

    def check_fits(self, loaded: LoadedModel, session: SlideSession) -> None:
        """Raise :class:`GpfmError` (one line) unless ``loaded`` reads ``session``'s features."""
        msg = key_mismatch(session, loaded.key, "slide model")
        if msg is not None:
            raise GpfmError(msg)

    def apply(self, session: SlideSession | None = None, *, sync: bool = False) -> bool:
        """Apply the loaded model to ``session`` (default: the chosen slide).

        Threaded unless ``sync``; a result already computed for this slide and model file
        is shown at once.

        Returns
        -------
        bool
            Whether the answer is shown (``sync`` or cached) or on its way (threaded).
        """
        session = session or self.selected()
        if self.loaded is None:
            raise GpfmError("no slide model: load one (from gpfm eval or gpfm train-mil) first")
        if session is None:
            raise GpfmError("no embedded slide: embed a slide in the Embed tab first")
        self.check_fits(self.loaded, session)
        self._sync = sync
        cached = session.cache.get(self._cache_key())
        if cached is not None:
            self.show_result(session, cached)
            return True
        if self.job.running:  # the newest request wins: stop the one running
            self._pending = session
            self.job.cancel()
            return True
        self.status.setText(f"Applying to {session.name} ({session.n_tiles} tiles)…")
        self.job.start(session, self.loaded.model, self.loaded.sha, device=self.device, sync=sync)
        return self.job.state == "done" if sync else True

    def _cache_key(self, sha: str | None = None) -> str:
        assert sha is not None or self.loaded is not None
        return f"slide_model:{sha or self.loaded.sha}"  # type: ignore[union-attr]

    def _on_done(self, result: Any) -> None:
        if result is None:
            return
        session, sha, res = result
        session.cache[self._cache_key(sha)] = res
        if self.loaded is not None and self.loaded.sha == sha:  # not replaced meanwhile
            self.show_result(session, res)

    def _on_end(self, _state: str) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and self.store.get(pending.key) is pending:
            self._guard(self.apply, pending)

    # ------------------------------------------------------------------ display
    def show_result(self, session: SlideSession, res: SlideResult) -> None:
        """Show ``res``: the answer, ``gpfm: attention``, the tiles' table and the gallery."""
        assert self.loaded is not None
        out = res.output
        self.shown = (session.key, self.loaded.sha)
        raster = session.cache.get("attention_raster")
        if raster is None:
            raster = session.cache["attention_raster"] = np.full(
                session.grid_shape, _FILL, np.float32
            )
        session.fill_raster(raster, res.rank)
        ov.upsert_image(
            self.viewer, ov.ATTENTION, raster, session, ov.find(self.viewer, session.name),
            colormap=ATTENTION_CMAP, contrast_limits=(0.0, 1.0), opacity=0.6, values=res.rank,
        )  # fmt: skip
        ov.show_only(self.viewer, session, ov.ATTENTION)
        tiles = ov.find(self.viewer, ov.TILES, session)
        if tiles is not None and len(tiles.data) == session.n_tiles:
            tiles.features["attention"] = out.attention
            tiles.features["attention_weight"] = res.weight
        self.answer_label.setText(answer_text(self.loaded.model, out))
        how = out.precision + (f" ({out.check})" if out.check else "")
        self.status.setText(
            f"{session.name}: {session.n_tiles} tiles in {res.seconds:.2f} s, {how}. "
            f"gpfm: attention shows each tile's attention rank on this slide (0 = least, "
            f"1 = most attended); the gallery shows the most attended tiles with their "
            f"attention weight (softmax: the weights of all tiles sum to 1)."
        )
        self._refresh_gallery()

    def result(self, session: SlideSession | None = None) -> SlideResult | None:
        """The loaded model's result on ``session`` (default: the chosen slide), if computed."""
        session = session or self.selected()
        if session is None or self.loaded is None:
            return None
        return session.cache.get(self._cache_key())

    def _refresh_gallery(self) -> None:
        if self.shown is None:
            return
        session = self.store.get(self.shown[0])
        res = self.result(session) if session is not None else None
        if session is None or res is None:
            return
        k = min(int(self.k_spin.value()), session.n_tiles)
        top = np.argsort(-res.output.attention, kind="stable")[:k]
        self.hits = [Hit(session.key, session.name, int(i), float(res.weight[i])) for i in top]
        self.gallery.set_hits(self.hits)
        self._load_thumbnails(session, sync=self._sync)

    def _load_thumbnails(self, session: SlideSession, *, sync: bool = False) -> None:
        self.thumbs.cancel()
        if session.slide_path is None or not self.hits:
            return
        items = [
            (str(session.slide_path), *(int(v) for v in session.coords[h.index]), session.tile_size_xy)
            for h in self.hits
        ]  # fmt: skip
        if not self.thumbs.running:
            self.thumbs.start(items, sync=sync)

    def _on_thumb(self, step: Step) -> None:
        _generation, i, rgb, why = step.payload  # one query at a time here: no generations
        with contextlib.suppress(RuntimeError):  # the dock was closed meanwhile
            self.gallery.set_thumbnail(i, rgb, why=why)

    def go_to(self, hit: Hit) -> None:
        """Centre the view on a gallery tile."""
        session = self.store.get(hit.key)
        if session is None:
            return
        centre_on_tile(self.viewer, session, hit.index)
        self.status.setText(f"{hit.name}: tile {hit.index}, attention weight {hit.score:.4f}")

    # ------------------------------------------------------------------ plumbing
    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # one line in the viewer, never a traceback
            notify_error(exc)
            return None

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load slide model", str(Path.home()), "Slide model (*.safetensors)"
        )
        if path:
            self.load_model(path)
