"""AdamW with DINOv2's parameter groups (GPFM: ``pretrain/dinov2/utils/param_groups.py``):
layer-wise lr decay, no weight decay on biases, norms and LayerScale gammas."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["build_optimizer", "param_groups", "scaled_lr"]


def scaled_lr(base_lr: float, global_batch: int, ref_batch: int = 1024) -> float:
    """``base_lr * sqrt(global_batch / ref_batch)`` (DINOv2's square-root scaling)."""
    return base_lr * math.sqrt(global_batch / ref_batch)


def _layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for ``blocks.i``, num_layers+1 for everything after (norm, heads)."""
    if "backbone." not in name:
        return num_layers + 1
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")):
        return 0
    if ".blocks." in name:
        return int(name.split(".blocks.")[1].split(".")[0]) + 1
    return num_layers + 1


def param_groups(
    student: nn.Module,
    *,
    num_layers: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    token_weight_decay: bool = True,
    freeze_expert_last_layer: bool = True,
) -> list[dict[str, Any]]:
    """One group per trainable parameter with ``lr_multiplier``, ``wd_multiplier`` and
    ``is_last_layer`` (frozen during the first ``freeze_last_layer_steps``).

    Parameters
    ----------
    token_weight_decay : bool
        Decay the cls, position and mask tokens like any weight (DINOv2's rule, which exempts
        only biases, norms and ``gamma``); False exempts them and every 1-d parameter.
    freeze_expert_last_layer : bool
        The expert heads' last layers are "last layers" too (GPFM's expert heads are DINO
        heads, whose ``last_layer`` the freeze applies to); False: only the DINO/iBOT heads'.
    """
    groups = []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layerwise_decay ** (num_layers + 1 - _layer_id(name, num_layers))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
        if not token_weight_decay:
            no_wd = no_wd or p.ndim == 1 or "token" in name or "pos_embed" in name
        last = "last_layer" in name and (freeze_expert_last_layer or "expert_heads" not in name)
        groups.append(
            {
                "params": [p],
                "name": name,
                "lr_multiplier": lr_mult,
                "wd_multiplier": 0.0 if no_wd else 1.0,
                "is_last_layer": last,
            }
        )
    return groups


def build_optimizer(
    student: nn.Module, cfg: dict[str, Any], *, num_layers: int
) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups (lr/wd are set every step by ``apply_schedules``)."""
    o = cfg["optim"]
    groups = param_groups(
        student,
        num_layers=num_layers,
        layerwise_decay=o["layerwise_decay"],
        patch_embed_lr_mult=o["patch_embed_lr_mult"],
        token_weight_decay=o["token_weight_decay"],
        freeze_expert_last_layer=cfg["expert_head"]["freeze_last_layer"],
    )
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o["betas"]), weight_decay=0.0)


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """Set each group's lr and weight decay from the step's schedule ``values``."""
    for g in optimizer.param_groups:
        base = values["last_layer_lr"] if g["is_last_layer"] else values["lr"]
        g["lr"] = base * g["lr_multiplier"]
        g["weight_decay"] = values["wd"] * g["wd_multiplier"]
