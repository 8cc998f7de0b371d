"""Probe tab: annotate classes, train a linear probe, show predictions over the slide.

Each slide has its own annotation layers, ``gpfm: annotations (<slide>)`` (Shapes: polygons,
rectangles, ellipses) and ``gpfm: annotation points (<slide>)``, tagged with its ``slide_id``;
shapes and points carry a ``class`` feature (classes are shared by all slides). Keys 1-9 on
those layers pick the current class. The probe trains on the active slide's annotation
layers only; an edit of another slide's layers does not retrain it. Every annotation change
retrains after a 500 ms debounce (in a worker) and repaints the slide's ``gpfm: prediction``
(Labels, label = class index + 1, one colour per class) and ``gpfm: confidence`` (Image).
Annotations that touch no embedded tile are counted. A probe is applied only to slides
embedded with the encoder, weights and tiling it was trained on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from gpfm_core.errors import GpfmError
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget import _probe_io as pio
from napari_gpfm._widget._classes import ClassList
from napari_gpfm._widget._probe_files import ProbeFilesMixin
from napari_gpfm._widget._session import SessionStore, SlideSession, key_mismatch
from napari_gpfm._widget._workers import Job, Step, notify_error

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

DEBOUNCE_MS = 500


def train_job(
    session: SlideSession, labels: np.ndarray, names: list[str], colours: list[tuple[int, int, int]],
    *, cancel: threading.Event, groups: np.ndarray | None = None,
) -> Generator[Step, None, Any]:  # fmt: skip
    """Worker body: fit the probe on labelled tiles (CV grouped by annotation), predict all."""
    from gpfm_core.analysis import LinearProbe

    yield Step(0, 2, "fitting")
    # the probe records what its features were made with, so it is applied only alike
    probe = LinearProbe(
        encoder=session.encoder or None, weights_hash=session.weights_hash or None,
        tiling=dict(session.tiling) or None, class_colours=colours,
    )  # fmt: skip
    report = probe.fit(
        session.features, labels, class_names=names, groups=groups, grid_rc=session.grid_rc
    )
    if cancel.is_set():
        return None
    yield Step(1, 2, "predicting")
    pred, conf = probe.predict(session.features)
    return session, probe, report, pred, conf


def score_text(report: Any) -> str:
    """The report in words: tiles per class, the CV score and how it was computed."""
    counts = ", ".join(f"{k}: {v}" for k, v in report.n_per_class.items())
    if report.cv_balanced_accuracy is None:
        cv = f"CV balanced accuracy: n/a ({report.note or 'not computed'})."
    else:
        how = report.cv_scheme or f"{report.cv_folds}-fold CV"
        note = f"; {report.note}" if report.note else ""
        cv = f"CV balanced accuracy: {report.cv_balanced_accuracy:.2f} ({how}{note})."
    train = f" Training tiles: {report.train_balanced_accuracy:.2f} (optimistic)."
    return f"Tiles per class: {counts}. {cv}{train}"


class ProbeTab(ProbeFilesMixin, QWidget):
    """The Probe tab."""

    def __init__(
        self, viewer: napari.Viewer, store: SessionStore, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.store = store
        self.session: SlideSession | None = None
        self.probe: Any = None
        #: ``SlideSession.feature_key`` of the slide the probe was trained on (None: loaded)
        self.probe_key: tuple[Any, ...] | None = None
        self.report: Any = None
        self.n_outside = 0
        self.trainings = 0
        self._pending = False
        self._recolouring = False
        self.job = Job(train_job, name="GPFM probe", on_done=self._on_done, on_end=self._on_end)
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(DEBOUNCE_MS)
        self.timer.timeout.connect(lambda: self.train())

        self.classes = ClassList()
        self.auto_check = QCheckBox("retrain when annotations change")
        self.auto_check.setChecked(True)
        self.train_btn = QPushButton("Train now")
        self.report_label = QLabel(
            "Embed a slide, then draw shapes or points for two or more classes."
        )
        self.report_label.setWordWrap(True)
        self.apply_combo = QComboBox()
        buttons = {}
        for key, text in (("polygon", "Polygon"), ("rectangle", "Rectangle"), ("points", "Points"),
                          ("apply", "Apply probe"), ("save", "Save probe…"), ("load", "Load probe…"),
                          ("geojson", "Export GeoJSON…"), ("csv", "Export CSV…"), ("import", "Import GeoJSON…")):  # fmt: skip
            buttons[key] = QPushButton(text)
        self.buttons = buttons
        draw = QHBoxLayout()
        for key in ("polygon", "rectangle", "points"):
            draw.addWidget(buttons[key])
        apply_row = QHBoxLayout()
        apply_row.addWidget(self.apply_combo, 1)
        apply_row.addWidget(buttons["apply"])
        files = QGridLayout()
        for i, key in enumerate(("save", "load", "geojson", "csv", "import")):
            files.addWidget(buttons[key], i // 2, i % 2)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Classes (keys 1-9 pick one; double-click renames)"))
        lay.addWidget(self.classes)
        lay.addLayout(draw)
        lay.addWidget(self.auto_check)
        lay.addWidget(self.train_btn)
        lay.addWidget(self.report_label)
        lay.addLayout(apply_row)
        lay.addLayout(files)
        lay.addStretch(1)

        self.train_btn.clicked.connect(lambda: self.train())
        buttons["polygon"].clicked.connect(lambda: self.start_drawing("add_polygon"))
        buttons["rectangle"].clicked.connect(lambda: self.start_drawing("add_rectangle"))
        buttons["points"].clicked.connect(lambda: self.start_drawing("add"))
        buttons["apply"].clicked.connect(lambda: self._guard(self.apply_to_selected))
        buttons["save"].clicked.connect(
            lambda: self._dialog("save", "Save probe", "Probe (*.safetensors)", self.save_probe)
        )
        buttons["load"].clicked.connect(
            lambda: self._dialog("open", "Load probe", "Probe (*.safetensors)", self.load_probe)
        )
        buttons["geojson"].clicked.connect(
            lambda: self._dialog(
                "save", "Export GeoJSON", "GeoJSON (*.geojson *.json)", self.export_geojson
            )
        )
        buttons["csv"].clicked.connect(
            lambda: self._dialog("save", "Export CSV", "CSV (*.csv)", self.export_csv)
        )
        buttons["import"].clicked.connect(
            lambda: self._dialog(
                "open", "Import QuPath GeoJSON", "GeoJSON (*.geojson *.json)", self.import_geojson
            )
        )
        self.classes.current_changed.connect(self.set_current_class)
        self.classes.classes_changed.connect(self._classes_changed)
        self.classes.removed.connect(self._class_removed)

    # ------------------------------------------------------------------ layers
    def set_session(self, session: SlideSession | None) -> None:
        """Make ``session`` the slide annotated and predicted."""
        self.session = session
        self.apply_combo.clear()
        self.apply_combo.addItems([s.name for s in self.store])
        self.report_label.setText(
            "Draw shapes or points for two or more classes (Polygon / Rectangle / Points)."
            if session is not None
            else "Embed a slide first."
        )

    def _slide_layer(self, session: SlideSession) -> Any:
        return ov.find(self.viewer, session.name)

    def annotation_layers(self, session: SlideSession | None = None) -> tuple[Any, Any]:
        """``(shapes, points)`` annotation layers of ``session``'s slide (default: the active
        one); None for a layer not made yet. Never another slide's layers."""
        s = session or self.session
        if s is None:
            return None, None
        return (
            ov.find(self.viewer, ov.ANNOTATIONS, s),
            ov.find(self.viewer, ov.ANNOTATION_POINTS, s),
        )

    def _all_annotation_layers(self) -> list[Any]:
        kinds = (ov.kind_of(ov.ANNOTATIONS), ov.kind_of(ov.ANNOTATION_POINTS))
        return [ly for ly in self.viewer.layers if ov.info(ly).get("kind") in kinds]

    def ensure_layers(self) -> tuple[Any, Any]:
        """The active slide's annotation Shapes and Points layers (created once, wired to retrain)."""
        session = self.session
        if session is None:
            raise GpfmError("no embedded slide: embed a slide in the Embed tab first")
        fresh = tuple(layer is None for layer in self.annotation_layers(session))
        slide_layer = self._slide_layer(session)
        shapes = ov.upsert_shapes(self.viewer, ov.ANNOTATIONS, session, slide_layer)
        points = ov.upsert_points(self.viewer, ov.ANNOTATION_POINTS, session, slide_layer)
        for layer, new in zip((shapes, points), fresh, strict=True):
            if new:
                layer.events.data.connect(self._data_changed_for(session.key))
                for n in range(1, 10):
                    layer.bind_key(str(n), self._class_key(n - 1), overwrite=True)
        self.set_current_class(self.classes.current)
        return shapes, points

    def _class_key(self, index: int) -> Any:
        def pick(_layer: Any) -> None:
            self.classes.set_current(index)

        return pick

    def start_drawing(self, mode: str) -> None:
        """Select the matching annotation layer in drawing ``mode``."""
        try:
            shapes, points = self.ensure_layers()
        except GpfmError as exc:
            show_warning(str(exc))
            return
        layer = points if mode == "add" else shapes
        self.viewer.layers.selection.active = layer
        layer.mode = mode

    def set_current_class(self, index: int) -> None:
        """Class given to the next shapes / points (number keys call this)."""
        rgba = self.classes.rgba()
        if not 0 <= index < len(rgba):
            return
        for layer in self._all_annotation_layers():
            layer.feature_defaults = {"class": index}
            if ov.info(layer).get("kind") == ov.kind_of(ov.ANNOTATIONS):
                layer.current_edge_color = rgba[index]
            else:
                layer.current_face_color = rgba[index]

    def _recolour(self) -> None:
        rgba = self.classes.rgba()
        self._recolouring = True
        try:
            for layer in self._all_annotation_layers():
                if not len(layer.data):
                    continue
                cls = np.clip(pio._classes(layer, len(layer.data)), 0, len(rgba) - 1)
                if ov.info(layer).get("kind") == ov.kind_of(ov.ANNOTATIONS):
                    layer.edge_color = rgba[cls]
                else:
                    layer.face_color = rgba[cls]
        finally:
            self._recolouring = False

    def _data_changed_for(self, slide_id: str) -> Any:
        def changed(event: Any) -> None:
            if self._recolouring or getattr(event, "action", "added") not in (
                "added",
                "removed",
                "changed",
            ):
                return
            self._recolour()
            # only the active slide's annotations train its probe
            active = self.session.key if self.session is not None else None
            if self.auto_check.isChecked() and active == slide_id:
                self.timer.start()

        return changed

    def _classes_changed(self) -> None:
        self._recolour()
        self.set_current_class(self.classes.current)

    def _class_removed(self, index: int) -> None:
        for layer in self._all_annotation_layers():
            if not len(layer.data):
                continue
            cls = np.asarray(pio._classes(layer, len(layer.data)))
            drop = np.flatnonzero(cls == index)
            keep_cls = cls[cls != index]
            if drop.size:
                layer.selected_data = set(drop.tolist())
                layer.remove_selected()
            layer.features["class"] = np.where(keep_cls > index, keep_cls - 1, keep_cls)
        self._recolour()

    # ------------------------------------------------------------------ training
    def train(self, *, sync: bool = False) -> bool:
        """Label tiles from the annotations and fit the probe (threaded unless ``sync``)."""
        session = self.session
        if session is None:
            self.report_label.setText("Embed a slide first.")
            return False
        if self.job.running:
            self._pending = True
            return False
        ann = pio.collect(*self.annotation_layers(session))
        names = self.classes.names
        if ann.count == 0:
            self.report_label.setText(
                f"No annotations on {session.name} yet: draw shapes or points for two or "
                "more classes."
            )
            return False
        try:
            tiles = pio.label_tiles(session, ann)
        except GpfmError as exc:
            notify_error(exc)
            return False
        labels, self.n_outside = tiles.labels, tiles.n_outside
        counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
        used = [n for n, c in counts.items() if c > 0]
        if len(used) < 2:
            why = "no annotated tiles" if not used else f"only class '{used[0]}' has tiles"
            self.report_label.setText(
                f"Cannot train: {why}. Annotate embedded tissue with at least two classes."
                + self._outside_text()
            )
            return False
        self.report_label.setText("Training…")
        self.job.start(session, labels, names, self.classes.colours, groups=tiles.groups, sync=sync)
        return self.job.state == "done" if sync else True

    def _outside_text(self) -> str:
        return (
            f" {self.n_outside} annotation(s) outside the embedded tiles were ignored."
            if self.n_outside
            else ""
        )

    def _on_done(self, result: Any) -> None:
        if result is None:
            return
        session, self.probe, self.report, pred, conf = result
        self.probe_key = session.feature_key
        self.trainings += 1
        self.show_prediction(session, pred, conf)
        self.report_label.setText(score_text(self.report) + self._outside_text())

    def _on_end(self, state: str) -> None:
        if self._pending:
            self._pending = False
            self.timer.start()

    def show_prediction(self, session: SlideSession, pred: np.ndarray, conf: np.ndarray) -> None:
        """Paint ``gpfm: prediction`` / ``gpfm: confidence`` for ``session``."""
        session.prediction, session.confidence = pred, conf
        names = self.probe.class_names if self.probe is not None else self.classes.names
        colours = (
            self.probe.class_colours if self.probe is not None else None
        ) or self.classes.colours
        rgba = np.array([(*(v / 255 for v in c[:3]), 1.0) for c in colours], np.float32)
        layer = ov.find(self.viewer, ov.PREDICTION, session)
        key = (tuple(names), tuple(map(tuple, rgba.round(4).tolist())))
        cmap = (
            ov.label_colormap(rgba)
            if layer is None or layer.metadata.get("gpfm_cmap") != key
            else None
        )
        slide_layer = self._slide_layer(session)
        raster = session.raster(pred + 1, fill=0, dtype=np.int32)
        layer = ov.upsert_labels(
            self.viewer, ov.PREDICTION, raster, session, slide_layer, colormap=cmap, opacity=0.45,
            values=pred + 1,
        )  # fmt: skip
        layer.metadata["gpfm_cmap"] = key
        craster = session.raster(conf.astype(np.float32), fill=-1.0)
        ov.upsert_image(
            self.viewer, ov.CONFIDENCE, craster, session, slide_layer, colormap="viridis",
            contrast_limits=(1.0 / max(len(names), 2), 1.0), opacity=0.7,
            visible=False,  # created hidden (eye icon shows it): it would hide the class colours
            values=conf,
        )  # fmt: skip
        ov.show_only(self.viewer, session, ov.PREDICTION)
        tiles = ov.find(self.viewer, ov.TILES, session)
        if tiles is not None and len(tiles.data) == session.n_tiles:
            tiles.features["prediction"] = pred + 1
            tiles.features["confidence"] = conf

    def check_probe_fits(self, session: SlideSession) -> None:
        """Raise :class:`GpfmError` unless the probe reads features like ``session``'s.

        A probe trained here, or loaded from a file that records them, needs the encoder,
        weights and tiling it was trained on (:attr:`probe_key`); an older probe file (it
        names the encoder and width only) needs those two.
        """
        if self.probe is None:
            raise GpfmError("no probe yet: annotate and train, or load a saved probe")
        if self.probe_key is not None:
            msg = key_mismatch(session, self.probe_key, "probe")
            if msg is not None:
                raise GpfmError(msg)
            return
        if self.probe.embed_dim != session.features.shape[1] or (
            self.probe.encoder and session.encoder and self.probe.encoder != session.encoder
        ):
            raise GpfmError(
                f"{session.name} was embedded with another encoder: re-embed it with "
                f"{self.probe.encoder}"
            )
