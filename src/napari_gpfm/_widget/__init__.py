"""The napari-gpfm dock widget (npe2 command ``napari-gpfm.dock``)."""

from __future__ import annotations

from napari_gpfm._widget._dock import GpfmDock

__all__ = ["GpfmDock"]
