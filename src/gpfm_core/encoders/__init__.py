"""Encoder registry: GPFM as published, expert encoders, any timm model, local checkpoints.

>>> from gpfm_core.encoders import create_encoder, preprocess
>>> enc = create_encoder("gpfm", weights="GPFM.pth", device="cuda")    # doctest: +SKIP
>>> feats = enc(preprocess(tiles, enc.meta, device="cuda"))            # (B, 1024)  # doctest: +SKIP

Names: ``gpfm``, ``gpfm-student``, ``uni``, ``phikon``, ``conch``, ``hed-texture``, ``tiny-vit``,
``tiny-expert``, ``"timm:<model>"``, or a checkpoint path. Importing this package does not
import torch: the public names are resolved lazily (PEP 562), torch loads on first use of a
builder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpfm_core.encoders._base import Encoder, build_timm_encoder
    from gpfm_core.encoders._checkpoint import (
        convert_dinov2_chunks,
        file_sha256,
        load_checkpoint_file,
        load_state_dict_strict,
        locate_state_dict,
        read_checkpoint,
        read_safetensors_metadata,
        save_encoder_safetensors,
        unwrap_state_dict,
    )
    from gpfm_core.encoders._factory import (
        create_encoder,
        default_encoder_name,
        resolve_device,
        weights_status,
    )
    from gpfm_core.encoders._hub import find_local_weights, resolve_weights, weights_env_var
    from gpfm_core.encoders._meta import EncoderMeta
    from gpfm_core.encoders._preprocess import preprocess
    from gpfm_core.encoders._registry import get_encoder_meta, list_encoders, register_encoder
    from gpfm_core.encoders.local import read_checkpoint_spec

_EXPORTS: dict[str, str] = {
    "Encoder": "_base",
    "build_timm_encoder": "_base",
    "convert_dinov2_chunks": "_checkpoint",
    "file_sha256": "_checkpoint",
    "load_checkpoint_file": "_checkpoint",
    "load_state_dict_strict": "_checkpoint",
    "locate_state_dict": "_checkpoint",
    "read_checkpoint": "_checkpoint",
    "read_safetensors_metadata": "_checkpoint",
    "save_encoder_safetensors": "_checkpoint",
    "unwrap_state_dict": "_checkpoint",
    "create_encoder": "_factory",
    "default_encoder_name": "_factory",
    "resolve_device": "_factory",
    "weights_status": "_factory",
    "find_local_weights": "_hub",
    "resolve_weights": "_hub",
    "weights_env_var": "_hub",
    "EncoderMeta": "_meta",
    "preprocess": "_preprocess",
    "get_encoder_meta": "_registry",
    "list_encoders": "_registry",
    "register_encoder": "_registry",
    "read_checkpoint_spec": "local",
}

__all__ = [
    "Encoder",
    "EncoderMeta",
    "build_timm_encoder",
    "convert_dinov2_chunks",
    "create_encoder",
    "default_encoder_name",
    "file_sha256",
    "find_local_weights",
    "get_encoder_meta",
    "list_encoders",
    "load_checkpoint_file",
    "load_state_dict_strict",
    "locate_state_dict",
    "preprocess",
    "read_checkpoint",
    "read_checkpoint_spec",
    "read_safetensors_metadata",
    "register_encoder",
    "resolve_device",
    "resolve_weights",
    "save_encoder_safetensors",
    "unwrap_state_dict",
    "weights_env_var",
    "weights_status",
]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
