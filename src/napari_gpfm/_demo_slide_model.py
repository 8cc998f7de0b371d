"""The demo's slide model: ABMIL trained on the library's demo slides, applied in the dock.

``napari-gpfm demo`` (:func:`napari_gpfm._demo.add_analysis_dock`) calls
:func:`add_slide_model` after embedding the sample slide, so the Slide model tab shows an
answer and ``gpfm: attention (<slide>)`` exists. The model is trained here, once per encoder
and tiling, on :func:`gpfm_core.evaluation.make_demo_data`'s carcinoma-share task; it is
kept in the demo's output folder, and later runs only load it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from gpfm_core.errors import GpfmError

__all__ = ["SLIDE_TASK", "add_slide_model", "demo_slide_model_path"]

log = logging.getLogger(__name__)

#: Slide task of the demo's slide model (:mod:`gpfm_core.evaluation.demo`).
SLIDE_TASK = "carcinoma-share"


def demo_slide_model_path(out_dir: str | os.PathLike[str], encoder: str) -> Path:
    """Where the demo keeps its slide model for ``encoder``:
    ``<out_dir>/slide_model/<encoder>/carcinoma-share.safetensors``."""
    from gpfm_core.evaluation.spec import encoder_folder_name

    return (
        Path(out_dir) / "slide_model" / encoder_folder_name(encoder) / f"{SLIDE_TASK}.safetensors"
    )


def _why_not(session: Any, carcinoma: Path) -> str | None:
    """Why the demo slides cannot be made for ``session``'s tiling (None: they can)."""
    from gpfm_core.evaluation.demo import MPP, TILE

    tile_px = int(session.tiling.get("tile_px") or 0)
    mpp = float(session.tiling.get("requested_mpp") or 0.0)
    overlap = int(session.tiling.get("overlap_px") or 0)
    if not carcinoma.is_file():
        return "he_patch_1000.png is not in GPFM_DATA_DIR"
    if abs(mpp - MPP) > 1e-4 or tile_px < 16 or TILE % tile_px or overlap:
        return f"the demo slides have no {tile_px} px tiling at {mpp} µm/px, overlap {overlap}"
    return None


def add_slide_model(
    dock: Any, session: Any, *, out_dir: str | os.PathLike[str], slide_path: str | os.PathLike[str]
) -> Path | None:
    """Train (once) the demo's slide model and apply it to ``session`` in the Slide model tab.

    The model is ABMIL (the paper's recipe, 20 epochs at most) trained on the carcinoma-share task of
    :func:`gpfm_core.evaluation.make_demo_data`: 40 generated slides of skin with a carcinoma
    focus, class ``high`` when carcinoma makes more than 20 % of the slide. Their features
    are made with the session's encoder at the session's tiling (``make_demo_data(tile_px=)``),
    so the model fits the demo slide's features. A model file already in
    :func:`demo_slide_model_path` that fits them is only loaded. The demo slide is skin
    without carcinoma (``low`` is the expected answer); ``gpfm: attention`` shows where the
    model looked. Afterwards the dock's current tab shows its overlay again (the Retrieve
    tab's similarity in the demo): the attention layer stays, hidden.

    Parameters
    ----------
    dock
        The :class:`~napari_gpfm._widget.GpfmDock`.
    session
        The embedded demo slide's :class:`~napari_gpfm._widget._session.SlideSession`.
    out_dir
        The demo's output folder (the model and its training data go under ``slide_model/``).
    slide_path
        The sample skin slide (the demo slides' skin tiles come from it).

    Returns
    -------
    pathlib.Path or None
        The model file; None (one line printed) when the demo slides cannot be made here —
        ``he_patch_1000.png`` is not in ``GPFM_DATA_DIR``, the session's tiling is not one
        of theirs, or the data folder holds something else — or the tab refused the model
        (its notification says why). The rest of the demo goes on either way.
    """
    from gpfm_core.evaluation import MILConfig, make_demo_data, train_slide_model
    from gpfm_core.evaluation.demo import CLASSES
    from napari_gpfm._widget._slide_model_tab import read_slide_model

    tab = dock.slide_model_tab
    path = demo_slide_model_path(out_dir, session.encoder or "unknown")
    try:
        fits = path.is_file() and read_slide_model(path).key == session.feature_key
    except GpfmError:
        fits = False  # a damaged file: train again
    if not fits:
        carcinoma = Path(os.environ.get("GPFM_DATA_DIR") or ".") / "he_patch_1000.png"
        why = _why_not(session, carcinoma)
        if why is not None:
            print(f"napari-gpfm demo: no slide model ({why})", flush=True)
            return None
        t0 = time.perf_counter()
        tile_px = int(session.tiling["tile_px"])
        # the paper's ABMIL and optimiser; 20 epochs (the default 50 take ~4x longer and the
        # demo task is separated by then: validation AUROC 1.0 either way)
        config = MILConfig(max_epochs=20, min_epochs=5, patience=5)
        try:
            data = make_demo_data(
                path.parent / f"data_{tile_px}px", encoders=(session.encoder,), tile_px=tile_px,
                sources={"skin": slide_path, "carcinoma": carcinoma},
            )  # fmt: skip
            train_slide_model(
                data.slides_csv, features=data.features[session.encoder], classes=CLASSES,
                config=config, out=path,
            )  # fmt: skip
        except GpfmError as exc:  # the demo goes on without its slide model
            print(f"napari-gpfm demo: no slide model ({exc})", flush=True)
            return None
        log.info("demo: slide model trained in %.1f s", time.perf_counter() - t0)
    if not tab.load_model(path, sync=True):
        return None
    dock.show_tab_overlay()  # the current tab's overlay again (one overlay at a time)
    print(f"napari-gpfm demo: slide model {SLIDE_TASK}: {tab.answer_label.text()}", flush=True)
    return path
