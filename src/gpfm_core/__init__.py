"""gpfm_core: the GPFM pathology foundation model as a library, no Qt.

Slide I/O, tissue detection, tiling at physical resolution, the encoder registry, the
embedding pipeline, analysis, and distillation training. Heavy dependencies (torch, umap,
napari never) are imported lazily inside the functions that need them, so
``import gpfm_core`` and the ``gpfm`` CLI start fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

from gpfm_core.errors import EncoderError, GpfmError, SlideError

__all__ = ["EncoderError", "GpfmError", "SlideError", "__version__"]
