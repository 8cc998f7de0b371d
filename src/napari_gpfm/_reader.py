"""npe2 reader: a whole-slide image as a lazy multiscale RGB layer in µm.

``napari_get_reader(path)`` opens the slide (cheap: OpenSlide reads headers only) and
returns a reader function, or None when the file is not a slide it can read; a broken
slide file (empty, truncated, text renamed ``.svs`` ...) also shows ONE notification
line so the user learns why. A folder is accepted when it holds a DICOM whole-slide series
(the manifest sets ``accepts_directories``); any other folder gets None, silently (napari
offers every folder to every reader that accepts folders). The layer keeps a token of its open :class:`Slide` in
``layer.metadata["gpfm_slide"]``; the handle is closed when the last layer holding it
leaves the viewer.
"""

from __future__ import annotations

import logging
import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpfm_core.errors import GpfmError
from gpfm_core.slide import Slide, dicom_series_file, open_slide
from napari_gpfm._notify import notify_error, notify_warning
from napari_gpfm._pyramid import build_pyramid

__all__ = [
    "SLIDE_KEY",
    "close_unused_slides",
    "ensure_close_hook",
    "layer_scale",
    "layer_units",
    "napari_get_reader",
    "open_slide_quietly",
    "read_slide",
    "slide_for_layer",
    "slide_layer_data",
]

log = logging.getLogger(__name__)

#: ``layer.metadata`` key holding the registry token of the layer's open slide.
SLIDE_KEY = "gpfm_slide"

LayerDataTuple = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerDataTuple]]

_SLIDES: dict[str, Slide] = {}
_HOOKED: weakref.WeakSet[Any] = weakref.WeakSet()


def open_slide_quietly(path: str | os.PathLike[str]) -> Slide | None:
    """Open ``path`` or notify the user with one line and return None.

    Returns
    -------
    Slide or None
        None when the file is not a readable slide (the reason was notified).
    """
    name = Path(path).name or str(path)
    try:
        return open_slide(path)
    except GpfmError as exc:
        notify_error(f"napari-gpfm cannot open {name}: {exc}")
    except Exception as exc:  # a library bug must not become a traceback in napari
        log.exception("unexpected error opening %s", path)
        notify_error(f"napari-gpfm cannot open {name}: {type(exc).__name__}: {exc}")
    return None


def napari_get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """npe2 ``get_reader`` hook.

    Parameters
    ----------
    path
        One path (a one-element list is accepted too).

    Returns
    -------
    callable or None
        A function ``path -> [(levels, kwargs, "image")]``; None when the path is not a
        slide this plugin reads (a broken slide file is notified with one line).
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    if os.path.isdir(path) and dicom_series_file(path) is None:
        return None  # not a slide folder: no notification, another reader may take it
    slide = open_slide_quietly(path)
    if slide is None:
        return None
    opened: list[Slide] = [slide]

    def reader(p: Any) -> list[LayerDataTuple]:
        first = opened.pop() if opened else None
        if first is None:
            return read_slide(p)
        return [slide_layer_data(first)]

    return reader


def read_slide(path: str | os.PathLike[str] | Sequence[str]) -> list[LayerDataTuple]:
    """Open ``path`` as a layer-data list (empty, with one notification, when unreadable)."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    slide = open_slide_quietly(path)
    return [] if slide is None else [slide_layer_data(slide)]


def layer_scale(slide: Slide) -> tuple[float, float]:
    """``(row, col)`` world units per level-0 pixel: µm/px, or 1 when µm/px is unknown."""
    mpp = slide.info.mpp
    return (1.0, 1.0) if mpp is None else (float(mpp[1]), float(mpp[0]))


def layer_units(slide: Slide) -> tuple[str, str]:
    """``("µm", "µm")`` when the slide has µm/px, else ``("pixel", "pixel")``."""
    return ("pixel", "pixel") if slide.info.mpp is None else ("µm", "µm")


def slide_layer_data(slide: Slide, *, name: str | None = None) -> LayerDataTuple:
    """Layer-data tuple of ``slide`` as a lazy multiscale RGB image.

    Parameters
    ----------
    slide
        An open slide; it is registered and closed when its layer is removed.
    name
        Layer name (default: the file stem; for a DICOM series, its folder's name).

    Returns
    -------
    tuple
        ``(levels, kwargs, "image")``: ``levels`` are ``(H_i, W_i, 3)`` uint8 dask
        arrays, finest first; kwargs set ``rgb``, ``multiscale``, ``contrast_limits``
        (0, 255), ``scale`` and ``units`` (µm), and ``metadata``.
    """
    label = slide.path.name

    def on_error(message: str) -> None:
        notify_warning(f"part of {label} cannot be read and is shown white: {message}")

    pyramid = build_pyramid(slide, on_error=on_error)
    if slide.info.mpp is None:
        notify_warning(
            f"{label} has no µm/px in its metadata: shown in pixels; "
            "give the µm/px in the GPFM dock before tiling"
        )
    token = uuid.uuid4().hex
    _SLIDES[token] = slide
    metadata = {
        "slide_info": slide.info.to_dict(),
        "path": str(slide.path),
        "slide_id": slide.slide_id,
        "mpp": None if slide.info.mpp is None else list(slide.info.mpp),
        "pyramid_downsamples": list(pyramid.downsamples),
        SLIDE_KEY: token,
    }
    kwargs = {
        "name": name or _default_name(slide),
        "rgb": True,
        "multiscale": True,
        "contrast_limits": (0, 255),
        "scale": layer_scale(slide),
        "units": layer_units(slide),
        "metadata": metadata,
    }
    _hook_current_viewer()
    return (pyramid.levels, kwargs, "image")


def _default_name(slide: Slide) -> str:
    # a DICOM series is a folder of files named by level or by UID: the folder names the slide
    from gpfm_core.slide import slide_stem

    return slide_stem(slide.path)


def slide_for_layer(layer: Any) -> Slide | None:
    """The open :class:`Slide` behind a layer made by this reader, or None."""
    token = getattr(layer, "metadata", {}).get(SLIDE_KEY)
    slide = _SLIDES.get(token) if isinstance(token, str) else None
    return None if slide is None or slide.closed else slide


def ensure_close_hook(viewer: Any) -> None:
    """Close a layer's slide when the last layer holding it leaves ``viewer`` (idempotent)."""
    layers = viewer.layers
    if layers in _HOOKED:
        return
    _HOOKED.add(layers)
    layers.events.removed.connect(_on_removed)


def close_unused_slides(layers: Any, removed: Any) -> list[str]:
    """Close the slide of ``removed`` unless another layer in ``layers`` still uses it.

    Returns
    -------
    list of str
        Tokens of the slides closed.
    """
    token = getattr(removed, "metadata", {}).get(SLIDE_KEY)
    if not isinstance(token, str) or token not in _SLIDES:
        return []
    if any(lay.metadata.get(SLIDE_KEY) == token for lay in layers):
        return []
    slide = _SLIDES.pop(token)
    slide.close()
    log.info("closed %s", slide.path.name)
    return [token]


def _on_removed(event: Any) -> None:
    try:
        close_unused_slides(event.source, event.value)
    except Exception:  # never let a close error surface in napari's event loop
        log.exception("closing a slide failed")


def _hook_current_viewer() -> None:
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt / no viewer: nothing to hook
        viewer = None
    if viewer is not None:
        ensure_close_hook(viewer)
