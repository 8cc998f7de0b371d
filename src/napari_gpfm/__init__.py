"""napari_gpfm: the napari plugin for GPFM, thin glue over :mod:`gpfm_core`.

Only UI, layers and threading live here; every computation is in gpfm_core.
"""

from __future__ import annotations

__version__ = "0.1.0"
