"""Atomic, pickle-free training checkpoints.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: model (student, EMA teacher, heads, loss centres),
optimiser, grad scaler, step, RNG states (python, numpy, torch CPU/CUDA as tensors) and the
resolved config (YAML text). It is written to ``<name>.tmp-<pid>`` and moved into place with
``os.replace``; when writing fails the previous checkpoint is untouched.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpfm_core._atomic import atomic_path
from gpfm_core.errors import GpfmError

__all__ = [
    "CheckpointError",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

log = logging.getLogger(__name__)


class CheckpointError(GpfmError):
    """A checkpoint cannot be written or read."""


def get_rng_state() -> dict[str, Any]:
    """Every RNG state as tensors / ints (weights_only-safe)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python_version": int(version),
        "python_state": torch.tensor(state, dtype=torch.int64),
        "python_gauss": -1.0 if gauss is None else float(gauss),
        "python_has_gauss": gauss is not None,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    gauss = state["python_gauss"] if state["python_has_gauss"] else None
    random.setstate(
        (state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), gauss)
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path``.

    Raises
    ------
    CheckpointError
        The file cannot be written (disk full, permissions); the previous file at ``path``
        is left as it was.
    """
    dest = Path(path)
    try:
        with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)
    except (OSError, RuntimeError) as exc:
        # torch.save's zip writer turns a failed write (disk full) into a RuntimeError
        # whose context is the OSError; other RuntimeErrors are not ours to translate
        os_err = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(os_err, OSError):
            raise
        raise CheckpointError(
            f"cannot write checkpoint {dest} ({os_err.strerror or os_err}): free disk space or fix permissions; "
            "the previous checkpoint is intact"
        ) from exc
    log.info("saved checkpoint %s (step %s)", dest, payload.get("step"))
    return dest


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary unpickling).

    Raises
    ------
    CheckpointError
        Missing, truncated or not a training checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {p} not found: pass the checkpoint.pt of a gpfm train run"
        )
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle ...
        msg = " ".join(str(exc).split())[:160]
        raise CheckpointError(
            f"checkpoint {p} cannot be read safely ({msg}): use a checkpoint written by gpfm train"
        ) from None
    if not isinstance(data, dict) or "model" not in data or "config" not in data:
        raise CheckpointError(
            f"{p} is not a gpfm train checkpoint (no model/config): pass the run's checkpoint.pt"
        )
    return data
