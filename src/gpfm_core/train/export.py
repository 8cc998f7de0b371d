"""Export the EMA teacher backbone of a training checkpoint or teacher snapshot as an encoder
safetensors file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from gpfm_core.errors import ConfigError

__all__ = ["export_checkpoint"]

log = logging.getLogger(__name__)


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    dtype: str = "fp32",
    description: str = "",
    license: str = "unknown",
) -> Path:
    """Write the backbone of a ``gpfm train`` checkpoint so ``create_encoder(out)`` loads it.

    The EMA teacher is exported when the run self-distilled (as DINOv2/GPFM do), else the
    student. The safetensors carries the timm arch, its kwargs and an ``EncoderMeta`` (input
    size = global crop size, the student's mean/std, tiling = the training ``data.tile_px`` /
    ``data.mpp``).

    Parameters
    ----------
    checkpoint : path-like
        ``checkpoint.pt`` written by ``gpfm train``, or one of its teacher snapshots
        (``eval/training_<i>/teacher_checkpoint.pth`` or that folder,
        :mod:`gpfm_core.train.snapshots`).
    out : path-like
        Destination ``.safetensors``.
    name : str, optional
        Encoder name stored in the meta (default: the file stem).
    dtype : {"fp32", "fp16", "bf16"}
        Storage precision of the weights.

    Returns
    -------
    Path
        ``out``.
    """
    import torch

    from gpfm_core.encoders import EncoderMeta, save_encoder_safetensors
    from gpfm_core.train.snapshots import load_training_weights

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ConfigError(f"export dtype must be fp32, fp16 or bf16, got {dtype!r}")
    ckpt = load_training_weights(checkpoint)
    cfg: dict[str, Any] = yaml.safe_load(ckpt["config"])
    sd = ckpt["model"]
    prefix = (
        "teacher.backbone.model."
        if any(k.startswith("teacher.backbone.model.") for k in sd)
        else "student.backbone.model."
    )
    state = {
        k[len(prefix) :]: v.to(dtypes[dtype]) if v.is_floating_point() else v
        for k, v in sd.items()
        if k.startswith(prefix)
    }
    s = cfg["student"]
    kwargs = {**s["kwargs"], "dynamic_img_size": True}
    embed_dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    out_path = Path(out)
    meta = EncoderMeta(
        name=name or out_path.stem,
        family="gpfm",
        arch=s["arch"],
        embed_dim=embed_dim,
        input_px=int(cfg["crops"]["global_crops_size"]),
        patch_size=patch,
        mean=tuple(s["mean"]),
        std=tuple(s["std"]),
        interpolation="bicubic",
        tile_px=int(cfg["data"]["tile_px"]),
        tile_mpp=float(cfg["data"]["mpp"]),
        precision="fp32" if dtype == "fp32" else dtype,
        license=license,
        source=f"gpfm train, step {int(ckpt['step'])}",
        description=description
        or f"{'EMA teacher' if prefix.startswith('teacher') else 'student'} of a gpfm train run",
        weights_required=True,
    )
    save_encoder_safetensors(state, out_path, arch=s["arch"], kwargs=kwargs, meta=meta)
    log.info(
        "exported %s (%s, step %d) to %s", prefix.split(".")[0], s["arch"], ckpt["step"], out_path
    )
    return out_path
