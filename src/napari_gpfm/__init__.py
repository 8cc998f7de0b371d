"""napari_gpfm: the napari plugin for GPFM, thin glue over :mod:`gpfm_core`.

Only UI, layers and threading live here; every computation is in gpfm_core.
"""

from __future__ import annotations

__version__ = "0.1.0"

from napari_gpfm._triton_guard import avoid_triton_crash as _avoid_triton_crash

# napari imports this package before it calls the reader or the dock, i.e. before any
# torch import the plugin causes; see _triton_guard for why.
_avoid_triton_crash()
