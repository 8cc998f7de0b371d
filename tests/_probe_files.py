"""Probe files as older versions of napari-gpfm wrote them (shared by core and dock tests)."""

from __future__ import annotations

import json
from pathlib import Path


def write_older_probe(path: Path, out: Path) -> Path:
    """Copy the probe file ``path`` to ``out`` without the weights hash and tiling, as files
    written before they were recorded are."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as fh:
        meta = json.loads(fh.metadata()["gpfm_probe"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    del meta["weights_hash"], meta["tiling"]
    save_file(tensors, str(out), metadata={"gpfm_probe": json.dumps(meta)})
    return out
