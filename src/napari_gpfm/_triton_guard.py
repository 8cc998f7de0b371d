"""Keep torch from importing triton inside a napari process (it would segfault there).

libtriton bundles its own LLVM; loading it after Mesa's llvmpipe OpenGL driver (Xvfb, VMs,
remote desktops) has loaded the system LLVM crashes the whole process. torch imports triton
only to probe for ``torch.compile`` support, which the plugin never uses, so the plugin marks
triton unavailable as soon as it is imported, unless triton is already loaded or
``GPFM_ALLOW_TRITON=1`` is set. The ``gpfm`` CLI (gpfm_core) is not affected.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def avoid_triton_crash() -> None:
    """Mark triton unavailable in this process (idempotent; see the module docstring)."""
    if "triton" in sys.modules or os.environ.get("GPFM_ALLOW_TRITON") == "1":
        return
    sys.modules["triton"] = None  # type: ignore[assignment]  # import triton -> ImportError
    log.debug("triton marked unavailable in this napari process")
