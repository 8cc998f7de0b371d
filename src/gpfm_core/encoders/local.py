"""Encoders from a checkpoint file that describes itself.

A ``.safetensors`` file written by :func:`save_encoder_safetensors` (``gpfm export``) carries
``__metadata__`` keys ``gpfm.arch`` (timm model name), ``gpfm.kwargs`` (JSON keyword arguments)
and ``gpfm.meta`` (JSON :class:`EncoderMeta`), so ``create_encoder(path)`` needs nothing else.
Any checkpoint (``.safetensors``/``.pth``/``.pt``/``.bin``) may instead have a JSON sidecar
``<file>.json`` (or ``<stem>.json``) with keys ``arch``, ``kwargs`` and optionally ``meta``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._checkpoint import CHECKPOINT_SUFFIXES, read_safetensors_metadata
from gpfm_core.encoders._meta import EncoderMeta
from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    from gpfm_core.encoders._base import Encoder

__all__ = ["CheckpointSpec", "build_local", "read_checkpoint_spec"]


@dataclass(frozen=True)
class CheckpointSpec:
    """What a self-describing checkpoint says about itself."""

    arch: str
    kwargs: dict[str, Any]
    meta: EncoderMeta | None


def _sidecar(path: Path) -> Path | None:
    for cand in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if cand.is_file():
            return cand
    return None


def read_checkpoint_spec(path: str | os.PathLike[str]) -> CheckpointSpec:
    """Read arch / kwargs / meta from safetensors metadata or a JSON sidecar (no tensors read).

    Raises
    ------
    EncoderError
        The file is missing, has an unsupported suffix, or does not describe its architecture.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderError(f"checkpoint {p} is not an existing file: check the path")
    if not p.name.lower().endswith(CHECKPOINT_SUFFIXES):
        raise EncoderError(
            f"{p}: unsupported checkpoint type {p.suffix!r}, use one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    raw: dict[str, Any] = {}
    if p.suffix == ".safetensors":
        md = read_safetensors_metadata(p)
        if "gpfm.arch" in md:
            raw = {
                "arch": md["gpfm.arch"],
                "kwargs": md.get("gpfm.kwargs", "{}"),
                "meta": md.get("gpfm.meta"),
            }
    if not raw and (side := _sidecar(p)) is not None:
        try:
            raw = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EncoderError(
                f"sidecar {side} is not valid JSON ({exc}): fix or delete it"
            ) from exc
        if not isinstance(raw, dict) or "arch" not in raw:
            raise EncoderError(f"sidecar {side} needs an 'arch' key (timm model name)")
    if not raw:
        raise EncoderError(
            f"{p.name} does not say which architecture it holds (no gpfm.arch metadata, no {p.name}.json "
            f"sidecar): name its encoder, e.g. create_encoder('gpfm', weights=PATH) (CLI --encoder gpfm "
            f"--weights PATH; 'uni'/'phikon'/'conch' likewise), or 'timm:<model>' with weights=PATH"
        )
    kwargs = raw.get("kwargs") or {}
    meta = raw.get("meta")
    try:
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
        meta = json.loads(meta) if isinstance(meta, str) else meta
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise EncoderError(
            f"{p.name}: corrupt encoder metadata ({exc}): re-export the checkpoint"
        ) from exc
    return CheckpointSpec(
        arch=str(raw["arch"]), kwargs=kwargs, meta=EncoderMeta.from_dict(meta) if meta else None
    )


def build_local(
    *,
    path: Path,
    pretrained: bool = True,
    weights: Path | None = None,
    name: str | None = None,
    seed: int = 0,
    **kw: Any,
) -> Encoder:
    """Build the encoder a checkpoint describes and load its tensors (from ``weights`` if given).

    ``pretrained=False`` builds the described architecture with random weights.
    """
    import torch

    from gpfm_core.encoders._base import build_timm_encoder, create_timm_model
    from gpfm_core.encoders.gpfm import adapt_dinov2_state_dict
    from gpfm_core.encoders.timm_any import meta_from_timm_model

    spec = read_checkpoint_spec(path)
    kwargs = {**spec.kwargs, **kw}
    if spec.meta is not None:
        meta = spec.meta
        if name is not None:
            meta = meta.replace(name=name)
    else:
        with torch.device("meta"):
            skeleton = create_timm_model(spec.arch, kwargs, seed=seed)
        meta = meta_from_timm_model(
            skeleton,
            name=name or Path(path).stem,
            arch=spec.arch,
            family="local",
            source=str(path),
            description=f"{spec.arch} from {Path(path).name}",
        )
    adapter = adapt_dinov2_state_dict if spec.arch.startswith(("vit_", "eva")) else None
    src = weights if weights is not None else (Path(path) if pretrained else None)
    return build_timm_encoder(
        meta,
        arch=spec.arch,
        model_kwargs=kwargs,
        pretrained=False,
        weights=src,
        adapter=adapter,
        seed=seed,
    )
