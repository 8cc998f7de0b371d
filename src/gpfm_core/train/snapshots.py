"""Teacher snapshots every N iterations, beside the rolling checkpoint, as GPFM keeps them.

GPFM's ``train.py`` (``do_test``) saves the EMA teacher every
``evaluation.eval_period_iterations`` (12,500) iterations to
``<output_dir>/eval/training_<iteration>/teacher_checkpoint.pth`` as ``{"teacher":
state_dict}``, with the 0-based iteration: the released GPFM is ``training_87499``, the
teacher after 87,500 steps. ``gpfm train`` writes the same path after step ``s`` when
``s % train.snapshot_every == 0`` (iteration ``s - 1``), and adds the step and the resolved
config so ``gpfm export`` turns a snapshot into an encoder. Tensors, ints and strings only:
the file loads with ``torch.load(weights_only=True)``. A run without self-distillation (no
teacher) snapshots its student under ``"student"``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from gpfm_core.train.checkpoint import CheckpointError, save_checkpoint

__all__ = [
    "SNAPSHOT_DIR",
    "SNAPSHOT_NAME",
    "list_snapshots",
    "load_training_weights",
    "save_snapshot",
    "snapshot_path",
]

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "eval"
SNAPSHOT_NAME = "teacher_checkpoint.pth"
_FOLDER = re.compile(r"training_(\d+)$")


def snapshot_path(out_dir: str | os.PathLike[str], step: int) -> Path:
    """``<out_dir>/eval/training_<step - 1>/teacher_checkpoint.pth`` (GPFM's name)."""
    return Path(out_dir) / SNAPSHOT_DIR / f"training_{int(step) - 1}" / SNAPSHOT_NAME


def list_snapshots(out_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every snapshot of a run, by step."""
    root = Path(out_dir) / SNAPSHOT_DIR
    found = []
    for folder in root.glob("training_*") if root.is_dir() else []:
        m = _FOLDER.match(folder.name)
        if m and (folder / SNAPSHOT_NAME).is_file():
            found.append((int(m.group(1)) + 1, folder / SNAPSHOT_NAME))
    return sorted(found)


def _modules(model: Any) -> tuple[str, Any]:
    return ("teacher", model.teacher) if model.self_distill else ("student", model.student)


def save_snapshot(
    out_dir: str | os.PathLike[str],
    model: Any,
    *,
    step: int,
    config: str,
    sharded: bool = False,
    is_main: bool = True,
) -> Path | None:
    """Write the teacher (or student) of ``model`` after ``step`` steps; returns the path.

    Under FSDP (``sharded``) the full state is gathered on rank 0 (a collective: every rank
    calls this); the other ranks return None.

    Raises
    ------
    CheckpointError
        The file cannot be written (the run's checkpoint is untouched).
    """
    key, module = _modules(model)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        prefix = f"{key}."
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    elif is_main:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    if not is_main:
        return None
    path = snapshot_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {key: state, "step": int(step), "iteration": int(step) - 1, "config": config}
    return save_checkpoint(path, payload)


def load_training_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``gpfm train`` checkpoint or teacher snapshot as ``{"model", "config", "step"}``.

    ``path`` is ``checkpoint.pt``, a snapshot file, or its ``eval/training_<i>`` folder; a
    snapshot's modules are keyed like a checkpoint's (``teacher.backbone.model.*``).

    Raises
    ------
    CheckpointError
        Missing, unreadable, or neither a checkpoint nor a snapshot of ``gpfm train``.
    """
    import torch

    p = Path(path)
    if p.is_dir():
        p = p / SNAPSHOT_NAME
    if not p.is_file():
        raise CheckpointError(
            f"{p} not found: pass a run's checkpoint.pt or a snapshot folder eval/training_<N>"
        )
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle ...
        msg = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"{p} cannot be read safely ({msg})") from None
    if isinstance(data, dict) and "model" in data and "config" in data:
        return data  # a checkpoint.pt
    key = next((k for k in ("teacher", "student") if isinstance(data, dict) and k in data), None)
    if key is None or "config" not in data:
        raise CheckpointError(
            f"{p} is neither a gpfm train checkpoint nor one of its teacher snapshots "
            "(no model/teacher and config): pass a file written by gpfm train"
        )
    model = {f"{key}.{k}": v for k, v in data[key].items()}
    return {"model": model, "config": data["config"], "step": int(data.get("step", 0))}
