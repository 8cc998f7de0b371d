"""Embed tab: slide layer, encoder and tiling -> tile embeddings, with live coverage.

The run goes through :func:`gpfm_core.embed.iter_embed_slide` in a napari worker; each
batch paints its tiles on the slide's ``gpfm: coverage (<slide>)`` Labels layer (1 = tile
to embed, 2 = embedded), redrawn at most every 0.25 s. Cached embeddings (same slide,
encoder and tiling in the output folder) are reused at once. Cancel leaves the partial
coverage on screen and no ``.h5`` file (the core writes a temporary file and renames it only
when complete).

Each slide owns its tissue and grid layers (``gpfm: tissue (<slide>)``, ``gpfm: tile grid
(<slide>)``, tagged with its ``slide_id``); embedding a slide uses only its own tissue
layer. "Tissue + grid" and Embed lay the grid with the same call (:func:`grid_for`, the
arguments :func:`~gpfm_core.embed.iter_embed_slide` passes to ``make_tile_grid``): an
unedited tissue layer is embedded as *detected* tissue (so an existing file is reused),
an edited one as that mask, and the grid layer follows the edits.

The slide's µm/px comes from its metadata or, for a slide without it (or with a wrong
one), from the "Slide µm/px" field; the value is remembered per slide and used for tiling,
the layers' scale and the session.

"Keep ink" passes ``exclude_ink=False`` to the tissue detector (stains that colour tissue
blue or green); "Tissue + grid" shows the ink it found as ``gpfm: ink (<slide>)``, and the
option is part of the embeddings' cache key. "Load features…" opens a feature file made
elsewhere (gpfm, TRIDENT, CLAM; :func:`gpfm_core.embed.load_embeddings`) for the chosen
slide: tiles are placed by their own coordinates and tile size (a CLAM file whose contours
start their own grids is drawn tile by tile), and a file whose geometry cannot be known is
refused in one line.
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
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
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
from napari_gpfm._widget._slide_layers import (
    add_slide_grid_layer,
    add_slide_tissue_layers,
    rescale_slide_layers,
    tissue_fingerprint,
)
from napari_gpfm._widget._workers import Job, Step

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

DEFAULT_OUT = Path.home() / ".cache" / "napari-gpfm" / "embeddings"
_REFRESH_S = 0.25
#: Debounce between an edit of the tissue layer and the grid layer following it.
GRID_DEBOUNCE_MS = 300
MIN_TISSUE = 0.25


@dataclass(frozen=True)
class SlideRef:
    """What the dock needs from a slide layer (see ``napari_gpfm._reader``)."""

    layer_name: str
    path: Path
    slide_id: str
    #: µm/px from the slide's metadata (None when it has none)
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
    #: TissueMask from the slide's edited tissue layer; None: detect tissue
    tissue: Any = None
    #: µm/px entered in the dock (None: the slide's metadata)
    slide_mpp: tuple[float, float] | None = None
    min_tissue: float = MIN_TISSUE
    #: keep marker ink / marking dye as tissue (the detector's ``exclude_ink=False``)
    keep_ink: bool = False

    @property
    def tissue_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~gpfm_core.tissue.detect_tissue` for this run (the
        defaults left out, so a default run keys its file as the CLI does)."""
        return {"exclude_ink": False} if self.keep_ink else {}

    @property
    def level0_mpp(self) -> tuple[float, float]:
        """The slide's level-0 µm/px used for everything (entered value, else metadata)."""
        mpp = self.slide_mpp or self.ref.mpp
        assert mpp is not None  # params() refuses slides without one
        return mpp


def grid_for(slide: Any, params: EmbedParams, tissue: Any) -> Any:
    """The tile grid a run with ``params`` embeds on ``slide`` with ``tissue``.

    The one grid of the dock: "Tissue + grid" shows it and :func:`embed_job` embeds it,
    with exactly the arguments :func:`~gpfm_core.embed.iter_embed_slide` hands
    ``make_tile_grid`` (``tissue=None`` there detects tissue with
    :func:`~gpfm_core.tissue.detect_tissue`'s defaults, as "Tissue + grid" does).

    Parameters
    ----------
    slide
        The slide, opened with ``params.slide_mpp`` as its µm/px override.
    tissue
        ``TissueMask`` (detected or from the edited layer).

    Returns
    -------
    TileGrid
    """
    from gpfm_core.tiling import make_tile_grid

    return make_tile_grid(
        slide, mpp=float(params.mpp), tile_px=int(params.tile_px), overlap_px=0,
        min_tissue=float(params.min_tissue), tissue=tissue, tissue_options=params.tissue_options,
    )  # fmt: skip


def embed_job(params: EmbedParams, *, cancel: threading.Event) -> Generator[Step, None, Any]:
    """Worker body: embed (or reuse) and load; yields coverage steps.

    Returns ``(Embeddings, reused)``.
    """
    from gpfm_core.embed import iter_embed_slide, load_embeddings

    params.out_dir.mkdir(parents=True, exist_ok=True)
    gen = iter_embed_slide(
        params.ref.path, encoder=params.encoder, out_dir=params.out_dir, mpp=params.mpp,
        tile_px=params.tile_px, device=params.device, batch_size=params.batch_size, cancel=cancel, reuse=True,
        tissue=params.tissue, slide_mpp=params.slide_mpp, min_tissue=params.min_tissue,
        tissue_options=params.tissue_options,
        force=True,  # a cache: a file made otherwise (an edited mask) is replaced
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
    return load_embeddings(result.path), bool(result.reused)


class EmbedTab(QWidget):
    """The Embed tab.

    Signals
    -------
    embedded(SlideSession)
        A slide's embeddings are loaded.
    forget(str)
        The slide with this id changed its µm/px: its session no longer holds.
    """

    embedded = Signal(object)
    forget = Signal(str)

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
        self.last_reused: bool | None = None
        #: µm/px entered per slide id (used instead of the slide's metadata)
        self.slide_mpp: dict[str, float] = {}
        self._grid_timer = QTimer(self)
        self._grid_timer.setSingleShot(True)
        self._grid_timer.setInterval(GRID_DEBOUNCE_MS)
        self._grid_timer.timeout.connect(self._refresh_pending_grids)
        self._grids_pending: set[str] = set()
        #: slide id -> (fingerprint, TissueMask) of the tissue "Tissue + grid" detected
        self._detected: dict[str, tuple[str, Any]] = {}

        self.slide_combo = QComboBox()
        self.encoder_combo = QComboBox()
        self.mpp_spin = QDoubleSpinBox(
            decimals=3, minimum=0.05, maximum=64.0, singleStep=0.25, value=0.5
        )
        self.mpp_spin.setSuffix(" µm/px")
        self.slide_mpp_spin = QDoubleSpinBox(
            decimals=4, minimum=0.0, maximum=100.0, singleStep=0.01, value=0.0
        )
        self.slide_mpp_spin.setSuffix(" µm/px")
        self.slide_mpp_spin.setSpecialValueText("unknown: enter it")
        self.slide_mpp_spin.setToolTip(
            "level-0 µm per pixel of the chosen slide (from its metadata; enter it for a "
            "slide without one). Remembered per slide; used for tiling, layers and results."
        )
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
        self.ink_check = QCheckBox("keep ink")
        self.ink_check.setToolTip(
            "keep blue/green marker ink and marking dye as tissue (for stains that colour "
            "tissue blue or green: trichrome, Alcian blue); 'Tissue + grid' shows the ink found"
        )
        self.load_btn = QPushButton("Load features…")
        self.load_btn.setToolTip(
            "open a feature file of the chosen slide made elsewhere (gpfm, TRIDENT or CLAM .h5)"
        )
        self.progress = QProgressBar()
        self.status = QLabel("Open a slide (File > Open) to embed it.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Slide µm/px", self.slide_mpp_spin)
        form.addRow("Encoder", self.encoder_combo)
        form.addRow("Resolution", self.mpp_spin)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Tissue", self.ink_check)
        form.addRow("Output folder", out_row)
        buttons = QHBoxLayout()
        buttons.addWidget(self.tissue_btn)
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.load_btn)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.run_btn.clicked.connect(lambda: self.run())
        self.tissue_btn.clicked.connect(lambda: self.show_tissue())
        self.load_btn.clicked.connect(lambda: self._load_dialog())
        self.ink_check.toggled.connect(lambda _on: self._ink_option_changed())
        self.cancel_btn.clicked.connect(self.job.cancel)
        self.encoder_combo.currentTextChanged.connect(self._encoder_changed)
        self.slide_combo.currentTextChanged.connect(lambda _t: self._show_slide_mpp())
        for spin in (self.mpp_spin, self.tile_spin):  # shown grids follow the tiling
            spin.valueChanged.connect(lambda _v: self._schedule_grids())
        self.slide_mpp_spin.editingFinished.connect(
            lambda: self.set_slide_mpp(self.slide_mpp_spin.value())
        )
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
        self._show_slide_mpp()

    # ------------------------------------------------------------------ slide µm/px
    def current_ref(self) -> SlideRef | None:
        """The slide chosen in the combo."""
        return {r.layer_name: r for r in self.slide_refs()}.get(self.slide_combo.currentText())

    def mpp_for(self, ref: SlideRef) -> tuple[float, float] | None:
        """Level-0 µm/px ``(x, y)`` of ``ref``'s slide: entered in the dock, else metadata."""
        entered = self.slide_mpp.get(ref.slide_id)
        return (entered, entered) if entered else ref.mpp

    def _show_slide_mpp(self) -> None:
        ref = self.current_ref()
        mpp = None if ref is None else self.mpp_for(ref)
        self.slide_mpp_spin.blockSignals(True)
        self.slide_mpp_spin.setValue(0.0 if mpp is None else float(mpp[0]))
        self.slide_mpp_spin.blockSignals(False)

    def set_slide_mpp(self, value: float, ref: SlideRef | None = None) -> None:
        """Use ``value`` µm/px (square pixels) for ``ref``'s slide (default: the chosen one).

        The slide layer is rescaled to µm and its tissue and annotation layers with it; its
        tile-resolution layers and its session are dropped (their tiles were cut at the old
        µm/px: embed it again). 0 or the metadata value clears the entry.
        """
        ref = ref or self.current_ref()
        if ref is None:
            return
        old = self.mpp_for(ref)
        value = float(value)
        if value <= 0 or (ref.mpp is not None and np.allclose(ref.mpp, value, rtol=1e-6)):
            self.slide_mpp.pop(ref.slide_id, None)
        else:
            self.slide_mpp[ref.slide_id] = value
        new = self.mpp_for(ref)
        self._show_slide_mpp()
        if new == old:
            return
        self._rescale_slide(ref, old, new)
        self.status.setText(
            f"{ref.layer_name}: "
            + (f"{new[0]:g} µm/px" if new else "no µm/px")
            + (" (entered)" if ref.slide_id in self.slide_mpp else " (from the slide)")
        )

    def _rescale_slide(
        self, ref: SlideRef, old: tuple[float, float] | None, new: tuple[float, float] | None
    ) -> None:
        rescale_slide_layers(
            self.viewer, ov.find(self.viewer, ref.layer_name), ref.slide_id, old, new
        )
        self.forget.emit(ref.slide_id)

    def set_out_dir(self, folder: str | Path) -> None:
        """Use ``folder`` for embeddings (cached files there are reused)."""
        self.out_dir = Path(folder)
        self.out_edit.setText(str(folder))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Embeddings folder", str(self.out_dir))
        if folder:
            self.set_out_dir(folder)

    # ------------------------------------------------------------------ run
    def params(self, ref: SlideRef | None = None, *, tissue: bool = True) -> EmbedParams:
        """Settings of the next run on ``ref`` (default: the chosen slide).

        ``tissue=False`` leaves the slide's tissue layer unread (``params.tissue`` None).
        Raises :class:`GpfmError` when no slide is chosen or its µm/px is unknown.
        """
        ref = ref or self.current_ref()
        if ref is None:
            raise GpfmError(
                "no slide chosen: open a slide (File > Open) and pick it in the Embed tab"
            )
        if self.mpp_for(ref) is None:
            raise GpfmError(
                f"{ref.layer_name} has no µm/px: enter it in the Embed tab's 'Slide µm/px' field"
            )
        entered = self.slide_mpp.get(ref.slide_id)
        params = EmbedParams(
            ref, self.encoder_combo.currentText().strip(), float(self.mpp_spin.value()),
            int(self.tile_spin.value()), self.device_combo.currentText(), Path(self.out_dir),
            int(self.batch_spin.value()), None, None if entered is None else (entered, entered),
            keep_ink=self.ink_check.isChecked(),
        )  # fmt: skip
        if tissue:
            from dataclasses import replace

            params = replace(params, tissue=self._edited_tissue(params))
        return params

    def _open(self, params: EmbedParams) -> Any:
        from gpfm_core.slide import open_slide

        return open_slide(params.ref.path, mpp=params.slide_mpp)

    def show_tissue(self, *, sync: bool = False) -> Any:
        """Detect tissue and lay the tile grid for the chosen slide, as editable layers.

        Detection runs in a worker thread (``sync=True`` blocks, for tests and scripts);
        the slide's ``gpfm: tissue (<slide>)`` and ``gpfm: tile grid (<slide>)`` layers are
        added (replacing that slide's earlier ones only) on the main thread. Returns the
        worker, or ``(tissue, grid)`` when ``sync``.
        """
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_warning

        try:
            params = self.params(tissue=False)
        except GpfmError as exc:
            show_warning(str(exc))
            return None

        def compute() -> tuple[Any, Any]:
            from gpfm_core.tissue import detect_tissue

            with self._open(params) as slide:
                tissue = detect_tissue(slide, **params.tissue_options)
                grid = grid_for(slide, params, tissue)
            return tissue, grid

        def show(result: tuple[Any, Any]) -> None:
            tissue, grid = result
            layer, _grid_layer = add_slide_tissue_layers(
                self.viewer, tissue, grid, slide_id=params.ref.slide_id,
                slide_name=params.ref.layer_name, mpp=params.level0_mpp,
            )  # fmt: skip
            self._detected[params.ref.slide_id] = (
                ov.info(layer)["detected"], params.tissue_options, tissue,
            )  # fmt: skip
            self.watch_tissue(params.ref.slide_id)
            self.status.setText(
                f"{params.ref.layer_name}: {len(grid)} tiles on tissue; edit its tissue layer "
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

    def _ink_option_changed(self) -> None:
        """"Keep ink" changed: detect again where the chosen slide shows unedited tissue."""
        ref = self.current_ref()
        layer = None if ref is None else ov.find(self.viewer, ov.TISSUE, slide_id=ref.slide_id)
        if layer is not None and tissue_fingerprint(layer) == ov.info(layer).get("detected"):
            self.show_tissue()

    def _edited_tissue(self, params: EmbedParams) -> Any:
        """The slide's own tissue layer as a TissueMask when the user edited it, else None.

        Only the layer tagged with this slide's id counts. An unedited layer (its shapes
        hash to the detection's) gives None: the pipeline detects the same tissue itself
        and reuses a file made that way. An edited mask keeps the ink "Tissue + grid" found
        (same mask grid), so the tiles' ink fractions are still recorded.
        """
        from dataclasses import replace

        from napari_gpfm._layers import tissue_from_layer

        layer = ov.find(self.viewer, ov.TISSUE, slide_id=params.ref.slide_id)
        if layer is None:
            return None
        if tissue_fingerprint(layer) == ov.info(layer).get("detected"):
            return None
        with self._open(params) as slide:
            mask = tissue_from_layer(layer, slide)
        detected = self._detected.get(params.ref.slide_id, ("", {}, None))[2]
        ink = getattr(detected, "ink", None)
        if ink is not None and ink.shape == mask.mask.shape:
            mask = replace(mask, ink=ink)
        return mask

    # ------------------------------------------------------------------ grid follows edits
    def watch_tissue(self, slide_id: str) -> None:
        """Redraw ``slide_id``'s grid layer (debounced) whenever its tissue layer is edited."""
        layer = ov.find(self.viewer, ov.TISSUE, slide_id=slide_id)
        if layer is None or ov.info(layer).get("watched"):
            return
        layer.metadata[ov.META_KEY] = {**ov.info(layer), "watched": True}

        layer.events.data.connect(lambda _event=None: self._schedule_grids([slide_id]))

    def _schedule_grids(self, slide_ids: Any = None) -> None:
        """Redraw these slides' grid layers (default: every slide showing one) after a pause."""
        if slide_ids is None:
            slide_ids = [ov.info(ly)["slide_id"] for ly in self.viewer.layers
                         if ov.info(ly).get("kind") == "tile_grid"]  # fmt: skip
        self._grids_pending.update(slide_ids)
        if self._grids_pending:
            self._grid_timer.start()

    def _refresh_pending_grids(self) -> None:
        pending, self._grids_pending = self._grids_pending, set()
        for slide_id in pending:
            try:
                self.refresh_grid(slide_id)
            except Exception as exc:  # a half-drawn shape must not raise into napari
                log.warning("grid not refreshed: %s", exc)

    def refresh_grid(self, slide_id: str) -> Any:
        """Lay ``slide_id``'s grid again from its (edited) tissue layer; returns the grid."""
        ref = next((r for r in self.slide_refs() if r.slide_id == slide_id), None)
        old = ov.find(self.viewer, ov.TILE_GRID, slide_id=slide_id)
        if ref is None or old is None or self.mpp_for(ref) is None:
            return None
        params = self.params(ref)
        with self._open(params) as slide:
            tissue = params.tissue
            if tissue is None:  # unedited: the detected tissue (cached from "Tissue + grid")
                layer = ov.find(self.viewer, ov.TISSUE, slide_id=slide_id)
                fingerprint, opts, cached = self._detected.get(slide_id, ("", {}, None))
                if (cached is not None and layer is not None and opts == params.tissue_options
                        and ov.info(layer).get("detected") == fingerprint):  # fmt: skip
                    tissue = cached
                else:
                    from gpfm_core.tissue import detect_tissue

                    tissue = detect_tissue(slide, **params.tissue_options)
            grid = grid_for(slide, params, tissue)
        add_slide_grid_layer(
            self.viewer, grid, slide_id=slide_id, slide_name=ref.layer_name,
            mpp=params.level0_mpp,
        )  # fmt: skip
        return grid

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

    def _coverage_session(self, grid: Any) -> SlideSession:
        assert self._params is not None
        ref = self._params.ref
        (sx, sy), (tx, ty) = grid.stride_level0_xy, grid.tile_size_level0_xy
        return SlideSession(
            key=ref.slide_id, name=ref.layer_name, slide_path=None, features=np.zeros((len(grid), 0)),
            coords=grid.coords, grid_rc=grid.grid_rc, grid_shape=grid.grid_shape,
            stride=sx, tile_size=tx, stride_y=sy, tile_size_y=ty, mpp=grid.slide_mpp,
        )  # fmt: skip

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
            self._cov_session = self._coverage_session(grid)
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
        layer = ov.find(self.viewer, ov.COVERAGE, self._cov_session)
        ov.upsert_labels(
            self.viewer, ov.COVERAGE, self._coverage, self._cov_session, self._slide_layer(),
            colormap=cmap if layer is None else None, opacity=0.6,
        )  # fmt: skip
        if layer is None:  # a new coverage: it is what this slide shows now
            ov.show_only(self.viewer, self._cov_session, ov.COVERAGE)
        self.coverage_refreshes += 1

    def _on_done(self, result: tuple[Any, bool]) -> None:
        assert self._params is not None
        emb, self.last_reused = result
        ref = self._params.ref
        session = SlideSession.from_embeddings(
            emb,
            key=ref.slide_id,
            name=ref.layer_name,
            slide_path=ref.path,
            mpp=self._params.level0_mpp,
            path=emb.path,
        )
        if session.n_tiles == 0:
            raise GpfmError(
                f"{ref.layer_name}: no tissue tile was found; check the slide or lower min tissue"
            )
        self._adopt(session, "reused" if self.last_reused else "embedded")

    def _adopt(self, session: SlideSession, how: str) -> None:
        """Show ``session``'s tiles as its coverage, keep it and make it active."""
        self._cov_session = session
        self._coverage = session.raster(np.full(session.n_tiles, 2, np.uint8), fill=0)
        self._paint_coverage(force=True)
        ov.show_only(self.viewer, session, ov.COVERAGE)
        self.store.add(session)
        where = session.embeddings_path.name if session.embeddings_path else ""
        self.status.setText(f"{session.name}: {session.n_tiles} tiles {how} ({where}).")
        self.embedded.emit(session)

    # ------------------------------------------------------------------ foreign files
    def load_features(
        self, path: str | Path, *, coords_file: str | Path | None = None, ref: SlideRef | None = None
    ) -> SlideSession:
        """Load a feature file made elsewhere (gpfm, TRIDENT, CLAM) for ``ref``'s slide.

        Tiles are placed by the file's own ``coords`` and tile size
        (:attr:`gpfm_core.embed.Embeddings.geometry`); a CLAM file whose contours start their
        own grids is drawn tile by tile (one notification says so). The file must fit the
        slide: its slide id and level-0 size when it records them, else its tiles inside it.

        Parameters
        ----------
        path
            The ``.h5`` file.
        coords_file
            Its patching file (CLAM's feature files carry no tile geometry; a ``patches``
            folder beside ``h5_files`` is found without it).
        ref
            The slide (default: the one chosen in the combo).

        Returns
        -------
        SlideSession

        Raises
        ------
        GpfmError
            No slide chosen, an unreadable file, a file of another slide, or a tile geometry
            that cannot be known (one line naming the way out).
        """
        import warnings

        from gpfm_core.embed import GeometryWarning, load_embeddings
        from napari_gpfm._notify import notify_info, notify_warning

        ref = ref or self.current_ref()
        if ref is None:
            raise GpfmError("no slide chosen: open the slide the features belong to and pick it")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GeometryWarning)
            emb = load_embeddings(path, coords_file=coords_file)
        if not emb.geometry.known:  # one line: the note says what is missing and the way out
            raise GpfmError(emb.geometry.note or f"{Path(path).name}: tile geometry unknown")
        self._check_fits(emb, ref)
        session = SlideSession.from_embeddings(
            emb, key=ref.slide_id, name=ref.layer_name, slide_path=ref.path,
            mpp=self.mpp_for(ref) or (1.0, 1.0), path=emb.path,
        )  # fmt: skip
        if session.n_tiles == 0:
            raise GpfmError(f"{Path(path).name} holds no tiles: choose the slide's feature file")
        for w in caught:
            if issubclass(w.category, GeometryWarning):
                notify_warning(w.message)
        if not session.exact:
            notify_info(
                f"{Path(path).name}: its tiles lie on several grids (CLAM's per-contour grids, "
                f"up to {emb.geometry.grid_error_level0} level-0 px apart): overlays are drawn "
                "tile by tile at their coordinates; only the 3x3 neighbourhood query uses each "
                "tile's nearest cell of one grid"
            )
        self._adopt(session, "loaded")
        return session

    def _check_fits(self, emb: Any, ref: SlideRef) -> None:
        """Raise :class:`GpfmError` unless ``emb``'s tiles can belong to ``ref``'s slide."""
        from gpfm_core.slide import open_slide

        name = emb.path.name
        sid = emb.attrs.get("slide_id")
        if sid and str(sid) != ref.slide_id:
            raise GpfmError(
                f"{name} holds another slide ({emb.attrs.get('slide_name') or sid}), not "
                f"{ref.layer_name}: choose {ref.layer_name}'s own feature file"
            )
        with open_slide(ref.path) as slide:
            w0, h0 = slide.dimensions
        size = (emb.attrs.get("level0_width"), emb.attrs.get("level0_height"))
        if all(v is not None for v in size) and (int(size[0]), int(size[1])) != (w0, h0):
            raise GpfmError(
                f"{name} was made on a {int(size[0])}x{int(size[1])} px slide but "
                f"{ref.layer_name} is {w0}x{h0}: choose {ref.layer_name}'s own feature file"
            )
        xy = emb.coords
        if len(xy) and (xy.min() < 0 or xy[:, 0].max() >= w0 or xy[:, 1].max() >= h0):
            raise GpfmError(
                f"{name} has tiles outside {ref.layer_name} ({w0}x{h0} px): choose "
                f"{ref.layer_name}'s own feature file"
            )

    def _load_dialog(self) -> None:
        from napari_gpfm._widget._workers import notify_error

        path, _ = QFileDialog.getOpenFileName(
            self, "Load features", str(self.out_dir), "Feature files (*.h5 *.hdf5)"
        )
        if not path:
            return
        try:
            self.load_features(path)
        except GpfmError as exc:
            if "patching file" not in str(exc):
                notify_error(exc)
                return
            # a CLAM feature file alone: its patching file holds the tile geometry
            coords, _ = QFileDialog.getOpenFileName(
                self, "Its patching file (CLAM patches/<slide>.h5)", str(Path(path).parent),
                "Patching files (*.h5 *.hdf5)",
            )  # fmt: skip
            if not coords:
                notify_error(exc)
                return
            try:
                self.load_features(path, coords_file=coords)
            except Exception as again:  # one line, never a traceback
                notify_error(again)
        except Exception as exc:
            notify_error(exc)

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

