"""Embed tab: slide layer, encoder and tiling -> tile embeddings, with live coverage.

The run goes through :func:`gpfm_core.embed.iter_embed_slide` in a napari worker; each
batch paints its tiles on the ``gpfm: coverage`` Labels layer (1 = tile to embed,
2 = embedded), redrawn at most every 0.25 s. Cached embeddings (same slide, encoder and
tiling in the output folder) are reused at once. Cancel leaves the partial coverage on
screen and no ``.h5`` file (the core writes a temporary file and renames it when complete).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from gpfm_core.errors import GpfmError
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._session import SessionStore, SlideSession
from napari_gpfm._widget._workers import Job, Step

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

DEFAULT_OUT = Path.home() / ".cache" / "napari-gpfm" / "embeddings"
_REFRESH_S = 0.25


@dataclass(frozen=True)
class SlideRef:
    """What the dock needs from a slide layer (see ``napari_gpfm._reader``)."""

    layer_name: str
    path: Path
    slide_id: str
    mpp: tuple[float, float] | None


def slide_ref(layer: Any) -> SlideRef | None:
    """The slide behind an Image layer opened by the napari-gpfm reader, else None."""
    meta = getattr(layer, "metadata", None) or {}
    if not isinstance(layer, Image) or "path" not in meta:
        return None
    mpp = meta.get("mpp")
    pair = None if mpp is None else (float(mpp[0]), float(mpp[1]))
    return SlideRef(layer.name, Path(meta["path"]), str(meta.get("slide_id") or meta["path"]), pair)


@dataclass(frozen=True)
class EmbedParams:
    """One embedding run's settings."""

    ref: SlideRef
    encoder: str
    mpp: float
    tile_px: int
    device: str
    out_dir: Path
    batch_size: int = 64
    #: TissueMask from the viewer's (possibly edited) tissue layer; None: detect tissue
    tissue: Any = None


def embed_job(params: EmbedParams, *, cancel: threading.Event) -> Generator[Step, None, Any]:
    """Worker body: embed (or reuse) and load; yields coverage steps, returns Embeddings."""
    from gpfm_core.embed import iter_embed_slide, load_embeddings

    params.out_dir.mkdir(parents=True, exist_ok=True)
    gen = iter_embed_slide(
        params.ref.path, encoder=params.encoder, out_dir=params.out_dir, mpp=params.mpp,
        tile_px=params.tile_px, device=params.device, batch_size=params.batch_size, cancel=cancel, reuse=True,
        tissue=params.tissue, force=True,  # a cache: a file made otherwise (edited mask) is replaced
    )  # fmt: skip
    grid = None
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        if grid is None:  # first batch: the core's grid lays out the coverage layer
            grid = ev.grid
            yield Step(0, ev.total, "tiles", ("grid", grid))
        yield Step(ev.done, ev.total, "tiles", ("batch", grid.grid_rc[ev.indices]))
    return load_embeddings(result.path)


class EmbedTab(QWidget):
    """The Embed tab. ``embedded(SlideSession)`` fires when a slide's embeddings are loaded."""

    embedded = Signal(object)

    def __init__(
        self, viewer: napari.Viewer, store: SessionStore, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.store = store
        self.out_dir = DEFAULT_OUT
        self.job = Job(
            embed_job,
            name="GPFM embedding",
            on_step=self._on_step,
            on_done=self._on_done,
            on_end=self._on_end,
        )
        self._params: EmbedParams | None = None
        self._coverage: np.ndarray | None = None
        self._cov_session: SlideSession | None = None
        self._last_refresh = 0.0
        self.coverage_refreshes = 0

        self.slide_combo = QComboBox()
        self.encoder_combo = QComboBox()
        self.mpp_spin = QDoubleSpinBox(
            decimals=3, minimum=0.05, maximum=64.0, singleStep=0.25, value=0.5
        )
        self.mpp_spin.setSuffix(" µm/px")
        self.tile_spin = QSpinBox(minimum=16, maximum=4096, singleStep=32, value=224)
        self.tile_spin.setSuffix(" px")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.batch_spin = QSpinBox(minimum=1, maximum=1024, value=64)
        self.out_edit = QLineEdit(str(self.out_dir))
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit)
        out_row.addWidget(browse)
        self.run_btn = QPushButton("Embed slide")
        self.tissue_btn = QPushButton("Tissue + grid")
        self.tissue_btn.setToolTip(
            "detect tissue and show the tile grid as editable layers; embedding uses the "
            "edited tissue layer"
        )
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel("Open a slide (File > Open) to embed it.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Encoder", self.encoder_combo)
        form.addRow("Resolution", self.mpp_spin)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Output folder", out_row)
        buttons = QHBoxLayout()
        buttons.addWidget(self.tissue_btn)
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.run_btn.clicked.connect(lambda: self.run())
        self.tissue_btn.clicked.connect(lambda: self.show_tissue())
        self.cancel_btn.clicked.connect(self.job.cancel)
        self.encoder_combo.currentTextChanged.connect(self._encoder_changed)
        self.out_edit.editingFinished.connect(
            lambda: setattr(self, "out_dir", Path(self.out_edit.text()))
        )
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed):
            ev.connect(lambda _e=None: self.refresh_slides())
        self._fill_encoders()
        self.refresh_slides()

    # ------------------------------------------------------------------ choices
    def _fill_encoders(self) -> None:
        try:
            from gpfm_core.encoders import default_encoder_name, list_encoders

            names = [m.name for m in list_encoders()]
            default = default_encoder_name()
        except Exception as exc:  # registry unavailable: still usable by typing a name
            log.warning("encoder registry unavailable: %s", exc)
            names, default = ["tiny-vit"], "tiny-vit"
        self.encoder_combo.setEditable(True)
        self.encoder_combo.addItems(names)
        self.encoder_combo.setCurrentText(default)
        self._encoder_changed(default)

    def _encoder_changed(self, name: str) -> None:
        try:
            from gpfm_core.encoders import get_encoder_meta

            meta = get_encoder_meta(name)
        except Exception:
            return
        self.mpp_spin.setValue(float(meta.tile_mpp))
        self.tile_spin.setValue(int(meta.tile_px))

    def slide_refs(self) -> list[SlideRef]:
        """Slides open in the viewer (Image layers from the napari-gpfm reader)."""
        return [r for r in (slide_ref(lay) for lay in self.viewer.layers) if r is not None]

    def refresh_slides(self) -> None:
        """Refill the slide combo, keeping the current choice."""
        current = self.slide_combo.currentText()
        names = [r.layer_name for r in self.slide_refs()]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)

    def set_out_dir(self, folder: str | Path) -> None:
        """Use ``folder`` for embeddings (cached files there are reused)."""
        self.out_dir = Path(folder)
        self.out_edit.setText(str(folder))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Embeddings folder", str(self.out_dir))
        if folder:
            self.set_out_dir(folder)

    # ------------------------------------------------------------------ run
    def params(self) -> EmbedParams:
        """Settings of the next run; raises :class:`GpfmError` when no slide is chosen."""
        refs = {r.layer_name: r for r in self.slide_refs()}
        ref = refs.get(self.slide_combo.currentText())
        if ref is None:
            raise GpfmError(
                "no slide chosen: open a slide (File > Open) and pick it in the Embed tab"
            )
        if ref.mpp is None:
            raise GpfmError(f"{ref.layer_name} has no µm/px: open a slide with resolution metadata")
        return EmbedParams(
            ref, self.encoder_combo.currentText().strip(), float(self.mpp_spin.value()),
            int(self.tile_spin.value()), self.device_combo.currentText(), Path(self.out_dir),
            int(self.batch_spin.value()), self._edited_tissue(ref),
        )  # fmt: skip

    def show_tissue(self, *, sync: bool = False) -> Any:
        """Detect tissue and lay the tile grid for the chosen slide, as editable layers.

        Detection runs in a worker thread (``sync=True`` blocks, for tests and scripts);
        the ``gpfm: tissue`` and ``gpfm: tile grid`` layers are added on the main thread.
        Returns the worker, or ``(tissue, grid)`` when ``sync``.
        """
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_warning

        try:
            params = self.params()
        except GpfmError as exc:
            show_warning(str(exc))
            return None

        def compute() -> tuple[Any, Any]:
            from gpfm_core.slide import open_slide
            from gpfm_core.tiling import make_tile_grid
            from gpfm_core.tissue import detect_tissue

            with open_slide(params.ref.path) as slide:
                tissue = detect_tissue(slide)
                grid = make_tile_grid(slide, mpp=params.mpp, tile_px=params.tile_px, tissue=tissue)
            return tissue, grid

        def show(result: tuple[Any, Any]) -> None:
            from napari_gpfm._layers import add_tile_grid_layer, add_tissue_layer

            tissue, grid = result
            add_tissue_layer(self.viewer, tissue, mpp=params.ref.mpp)
            add_tile_grid_layer(self.viewer, grid, mpp=params.ref.mpp)
            self.status.setText(
                f"{params.ref.layer_name}: {len(grid)} tiles on tissue; edit gpfm: tissue "
                "to change what is embedded."
            )

        if sync:
            result = compute()
            show(result)
            return result
        worker = create_worker(compute)
        worker.returned.connect(show)
        worker.errored.connect(lambda exc: show_warning(f"tissue detection failed: {exc}"))
        worker.start()
        return worker

    def _edited_tissue(self, ref: SlideRef) -> Any:
        """The viewer's tissue layer for ``ref``'s slide as a TissueMask, else None.

        The tissue layer the reader/demo adds is editable; what the user left there is
        what tiling uses (None lets the pipeline detect tissue itself).
        """
        from napari.layers import Shapes

        from napari_gpfm._layers import tissue_from_layer
        from napari_gpfm._reader import slide_for_layer

        slide_layer = next((ly for ly in self.viewer.layers if ly.name == ref.layer_name), None)
        slide = slide_for_layer(slide_layer) if slide_layer is not None else None
        if slide is None:
            return None
        for layer in self.viewer.layers:
            meta = getattr(layer, "metadata", None) or {}
            if (
                isinstance(layer, Shapes)
                and meta.get("gpfm_kind") == "tissue"
                and list(meta.get("level0_size", ())) == list(slide.dimensions)
            ):
                return tissue_from_layer(layer, slide)
        return None

    def run(self, *, sync: bool = False) -> SlideSession | None:
        """Embed the chosen slide (threaded; ``sync=True`` blocks and returns the session)."""
        if self.job.running:
            self.status.setText("Embedding already running.")
            return None
        try:
            self._params = self.params()
        except GpfmError as exc:
            from napari.utils.notifications import show_warning

            show_warning(str(exc))
            self.status.setText(str(exc))
            return None
        self._coverage = None
        self.progress.setRange(0, 0)
        self.status.setText(f"Embedding {self._params.ref.layer_name} with {self._params.encoder}…")
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.job.start(self._params, sync=sync)
        if not sync or self.job.state != "done":
            return None
        return self.store.get(self._params.ref.slide_id)

    def cancel(self) -> None:
        """Stop the running embedding after its current batch."""
        self.job.cancel()

    def _slide_layer(self) -> Any:
        name = self._params.ref.layer_name if self._params else ""
        return ov.find(self.viewer, name)

    def _on_step(self, step: Step) -> None:
        kind, data = step.payload
        if kind == "grid":
            grid = data
            self._cov_session = SlideSession(
                key="coverage", name="coverage", slide_path=None, features=np.zeros((len(grid), 0)),
                coords=grid.coords, grid_rc=grid.grid_rc, grid_shape=grid.grid_shape,
                stride=grid.stride_level0, tile_size=grid.tile_size_level0, mpp=grid.slide_mpp,
            )  # fmt: skip
            self._coverage = self._cov_session.raster(np.ones(len(grid), np.uint8), fill=0)
            self._paint_coverage(force=True)
            self.progress.setRange(0, max(step.total, 1))
            return
        if self._coverage is None:
            return
        rc = data
        self._coverage[rc[:, 0], rc[:, 1]] = 2
        self.progress.setValue(step.done)
        self.status.setText(f"Embedded {step.done} / {step.total} tiles")
        self._paint_coverage(force=step.done >= step.total)

    def _paint_coverage(self, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_refresh < _REFRESH_S:
            return
        self._last_refresh = now
        if self._cov_session is None or self._coverage is None:
            return
        cmap = ov.label_colormap(np.array([[0.6, 0.6, 0.6, 0.35], [0.1, 0.9, 0.3, 0.55]]))
        layer = ov.find(self.viewer, ov.COVERAGE)
        ov.upsert_labels(
            self.viewer, ov.COVERAGE, self._coverage, self._cov_session, self._slide_layer(),
            colormap=cmap if layer is None else None, opacity=0.6,
        )  # fmt: skip
        self.coverage_refreshes += 1

    def _on_done(self, emb: Any) -> None:
        assert self._params is not None
        ref = self._params.ref
        session = SlideSession.from_embeddings(
            emb,
            key=ref.slide_id,
            name=ref.layer_name,
            slide_path=ref.path,
            mpp=ref.mpp,
            path=emb.path,
        )
        if session.n_tiles == 0:
            raise GpfmError(
                f"{ref.layer_name}: no tissue tile was found; check the slide or lower min tissue"
            )
        self._cov_session = session
        self._coverage = session.raster(np.full(session.n_tiles, 2, np.uint8), fill=0)
        self._paint_coverage(force=True)
        self.store.add(session)
        self.status.setText(
            f"{ref.layer_name}: {session.n_tiles} tiles embedded ({emb.path.name})."
        )
        self.embedded.emit(session)

    def _on_end(self, state: str) -> None:
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if state == "done" else 0)
        if state == "cancelled":
            self._paint_coverage(force=True)
            self.status.setText("Embedding cancelled: partial coverage shown, nothing saved.")
        elif state == "error":
            self.status.setText("Embedding failed (see the notification).")
