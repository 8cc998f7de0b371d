"""File and cross-slide actions of the Probe tab: apply, save / load, export / import."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QFileDialog

from gpfm_core.errors import GpfmError
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget import _probe_io as pio
from napari_gpfm._widget._classes import DEFAULT_CLASSES
from napari_gpfm._widget._session import SlideSession
from napari_gpfm._widget._workers import notify_error

log = logging.getLogger(__name__)


class ProbeFilesMixin:
    """Methods of :class:`~napari_gpfm._widget._probe_tab.ProbeTab` that touch files or other slides.

    Expects ``viewer``, ``store``, ``session``, ``probe``, ``classes``, ``apply_combo``,
    ``report_label``, ``timer``, ``ensure_layers``, ``show_prediction`` and ``_recolour``.
    """

    viewer: Any
    store: Any
    session: SlideSession | None
    probe: Any
    probe_key: Any
    check_probe_fits: Any
    annotation_layers: Any
    classes: Any
    apply_combo: Any
    report_label: Any
    timer: Any

    # ------------------------------------------------------------------ apply / files
    def apply_to(self, session: SlideSession) -> np.ndarray:
        """Predict every tile of another embedded slide with the current probe."""
        self.check_probe_fits(session)  # same encoder, weights and tiling
        pred, conf = self.probe.predict(session.features)
        self.show_prediction(session, pred, conf)
        self.report_label.setText(
            f"Probe applied to {session.name}: {session.n_tiles} tiles predicted."
        )
        return pred

    def apply_to_selected(self) -> None:
        """Apply the probe to the slide chosen in the combo."""
        session = self.store.by_name(self.apply_combo.currentText())
        if session is None:
            raise GpfmError("choose an embedded slide to apply the probe to")
        self.apply_to(session)

    def save_probe(self, path: str | Path) -> Path:
        """Save the trained probe (safetensors + JSON header)."""
        if self.probe is None:
            raise GpfmError("no probe to save: annotate two classes and train first")
        return self.probe.save(path)

    def load_probe(self, path: str | Path) -> None:
        """Load a saved probe, adopt its classes and apply it to the current slide."""
        import warnings

        from gpfm_core.analysis import LinearProbe, ProbeProvenanceWarning
        from napari_gpfm._notify import notify_warning
        from napari_gpfm._widget._session import feature_key

        dim = self.session.features.shape[1] if self.session is not None else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ProbeProvenanceWarning)
            self.probe = LinearProbe.load(path, embed_dim=dim)
        older = [w for w in caught if issubclass(w.category, ProbeProvenanceWarning)]
        for w in older:
            notify_warning(w.message)
        probe = self.probe
        # applied only to slides embedded with its encoder, weights and tiling; an older
        # file records the encoder name and width only (None: check_probe_fits checks those)
        self.probe_key = None if older else feature_key(
            probe.encoder, probe.weights_hash, probe.tiling, probe.embed_dim
        )
        self.classes.set_classes(list(self.probe.class_names), self.probe.class_colours)
        if self.session is not None:
            self.apply_to(self.session)

    def export_geojson(self, path: str | Path) -> Path:
        """Annotations and per-tile predictions of the current slide to QuPath GeoJSON."""
        s = self._need_session()
        ann = pio.collect(*self.annotation_layers(s))  # this slide's layers only
        return pio.export_geojson(
            path,
            s,
            ann,
            self.classes.names,
            self.classes.colours,
            prediction=s.prediction,
            confidence=s.confidence,
        )

    def export_csv(self, path: str | Path) -> Path:
        """Per-tile predictions of the current slide to CSV."""
        s = self._need_session()
        if s.prediction is None or s.confidence is None:
            raise GpfmError("no predictions to export: train or apply a probe first")
        return pio.export_csv(path, s, self._prediction_names(), s.prediction, s.confidence)

    def import_geojson(self, path: str | Path) -> int:
        """Add QuPath annotations to the annotation layers (new class names are added).

        Regions and lines go to the Shapes layer with their true geometry stored beside it
        (holes and parts kept, see :mod:`~napari_gpfm._widget._probe_io`), point
        annotations to the Points layer; detections and cells are counted and left out,
        and features without geometry are named, in one notification.

        Returns
        -------
        int
            Number of shapes and points added.
        """
        self._need_session()
        imported = pio.import_geojson(path)
        names = list(dict.fromkeys([*imported.shape_classes, *imported.point_classes]))
        if names and self.classes.names == list(DEFAULT_CLASSES) and not self._any_annotation():
            # nothing drawn with the starting classes yet: the file's classes (QuPath's
            # "Tumor", "Stroma" ...) replace them rather than sit beside two empty ones
            self.classes.set_classes(names)
        shapes, points = self.ensure_layers()

        def index_of(name: str) -> int:
            if name not in self.classes.names:
                i = self.classes.add_class(name)
                if name in imported.colours:
                    self.classes.set_colour(i, imported.colours[name])
            return self.classes.names.index(name)

        idx = [index_of(n) for n in imported.shape_classes]
        pidx = [index_of(n) for n in imported.point_classes]
        pio.add_imported(shapes, imported, idx)
        if len(imported.points):
            points.add(imported.points[:, ::-1])
            points.features.loc[points.features.index[-len(pidx) :], "class"] = pidx
        added = len(idx) + len(pidx)
        if added:
            self._recolour()
            self.timer.start()
        holes = f"; {imported.n_holes} hole(s) kept (not drawn by napari)" if imported.n_holes else ""
        show_info(imported.message + holes)
        return added

    def _any_annotation(self) -> bool:
        """Whether any slide has an annotation shape or point in the viewer."""
        kinds = (ov.kind_of(ov.ANNOTATIONS), ov.kind_of(ov.ANNOTATION_POINTS))
        return any(
            ov.info(layer).get("kind") in kinds and len(layer.data) > 0 for layer in self.viewer.layers
        )

    def _prediction_names(self) -> list[str]:
        return list(self.probe.class_names) if self.probe is not None else self.classes.names

    def _need_session(self) -> SlideSession:
        if self.session is None:
            raise GpfmError("no embedded slide: embed a slide in the Embed tab first")
        return self.session

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            notify_error(exc)
            return None

    def _dialog(self, kind: str, title: str, filt: str, fn: Any) -> None:
        get = QFileDialog.getSaveFileName if kind == "save" else QFileDialog.getOpenFileName
        path, _ = get(self, title, str(Path.home()), filt)
        if path:
            result = self._guard(fn, path)
            if result is not None and kind == "save":
                show_info(f"saved {Path(path).name}")
