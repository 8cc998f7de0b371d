"""Reading the project's small model files: safetensors tensors + a JSON config header.

Linear probes (:class:`gpfm_core.analysis.LinearProbe`) and slide models
(:class:`gpfm_core.evaluation.SlideModel`) are each one ``.safetensors`` file whose header
metadata holds a JSON document under a key of their own, with ``format`` and
``format_version`` fields. Nothing is unpickled: loading parses numbers and JSON only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import GpfmError

__all__ = ["KINDS", "read_model_file"]

#: Header key -> kind of the project's model files, named when one is given for the other.
KINDS = {"gpfm_probe": "linear probe (load it in the Probe tab)", "gpfm_slide_model": "slide model"}


def read_model_file(
    path: str | os.PathLike[str],
    meta_key: str,
    *,
    fmt: str,
    version: int,
    what: str,
    missing_fix: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors and JSON config of a model file, with its format and version checked.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    meta_key
        Header key of the JSON config.
    fmt, version
        The config's expected ``format`` and the newest ``format_version`` understood.
    what
        Name of the kind of file, for messages ("probe file", "slide model").
    missing_fix
        What to do when the file does not exist (ends the one-line message).

    Returns
    -------
    tuple
        ``{name: numpy array}`` and the config dict.

    Raises
    ------
    GpfmError
        Missing file, not a safetensors file with that header, another format, a newer
        version.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise GpfmError(f"{what} {p} not found: {missing_fix}")
    other = None
    try:
        with safe_open(str(p), framework="numpy") as fh:
            header = fh.metadata() or {}
            other = next((k for k in KINDS if k != meta_key and k in header), None)
            meta = json.loads(header[meta_key])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        if other is not None:  # the project's other kind of model file: say which it is
            raise GpfmError(f"{p} is a gpfm {KINDS[other]}, not a {what}: {missing_fix}") from exc
        raise GpfmError(f"{p} is not a gpfm {what} ({type(exc).__name__}): save it again") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise GpfmError(f"{p} is a damaged or foreign {what}: save it again")
    try:
        newer = int(meta.get("format_version", 0)) > version
    except (TypeError, ValueError):
        raise GpfmError(f"{p} is a damaged or foreign {what}: save it again") from None
    if newer:
        raise GpfmError(f"{p} was written by a newer napari-gpfm: upgrade to load it")
    return tensors, meta
