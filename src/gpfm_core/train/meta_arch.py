"""Unified knowledge distillation: student + EMA teacher + heads + frozen experts -> named losses.

``UnifiedDistillation.forward(batch, teacher_temp)`` returns a dict of named scalar losses
(``dino``, ``koleo``, ``ibot``, ``expert_<name>_cls``, ``expert_<name>_patch``) and their
weighted sum ``total``. Terms whose weight is 0 are not computed. Experts are held outside
the module tree (not trained, not checkpointed, not wrapped by DDP).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpfm_core.errors import ConfigError
from gpfm_core.train.config import REQUIRED
from gpfm_core.train.heads import DINOHead, ExpertHead
from gpfm_core.train.losses import (
    DINOLoss,
    ExpertCLSLoss,
    ExpertPatchLoss,
    KoLeoLoss,
    TargetStandardizer,
    iBOTPatchLoss,
)
from gpfm_core.train.models import Expert, StudentBackbone, normalise

__all__ = ["UnifiedDistillation", "check_init_weights", "expert_key"]


def expert_key(name: str) -> str:
    """A module/CSV-safe key for an expert name (``timm:vit_s`` -> ``timm_vit_s``)."""
    stem = re.sub(r"\.(safetensors|pth|pt|bin)$", "", name.rsplit("/", 1)[-1])
    return re.sub(r"[^A-Za-z0-9_]", "_", stem) or "expert"


def check_init_weights(student: dict[str, Any]) -> None:
    """Fail early (before experts load) when ``student.init_weights`` is needed and unusable.

    Raises
    ------
    ConfigError
        ``init_weights`` is ``required`` (a config such as ``gpfm`` that starts from a
        stage-1 backbone) or names no file.
    """
    init = student["init_weights"]
    if init == REQUIRED:
        raise ConfigError(
            "this config starts from given weights (GPFM distils a stage-1 DINOv2 ViT-L/14 "
            "trained on the same tiles): --set student.init_weights=PATH, or null for random init"
        )
    if init is not None and not Path(init).expanduser().is_file():
        raise ConfigError(
            f"student.init_weights {init} not found: pass the stage-1 checkpoint (GPFM layout, "
            "timm/HF or .safetensors) or null to start from random weights"
        )


class UnifiedDistillation(nn.Module):
    """GPFM's training meta-architecture.

    Parameters
    ----------
    cfg : dict
        Resolved training config.
    experts : list of Expert
        Frozen experts (may be empty: pure DINOv2 self-distillation).
    load_init : bool
        Load ``student.init_weights`` into the student (before the teacher copies it); False
        when a checkpoint will replace every weight anyway (``--resume``).

    Raises
    ------
    ConfigError
        ``student.init_weights`` is ``required`` (unset), missing or does not fit.
    """

    def __init__(
        self, cfg: dict[str, Any], experts: list[Expert], *, load_init: bool = True
    ) -> None:
        super().__init__()
        s, d, ib = cfg["student"], cfg["dino"], cfg["ibot"]
        if load_init:
            check_init_weights(s)
        self.mean, self.std = tuple(s["mean"]), tuple(s["std"])
        self.w_dino = float(d["loss_weight"])
        self.w_koleo = float(d["koleo_loss_weight"])
        self.koleo_sum = d["koleo_reduction"] == "sum"
        self.w_ibot = float(ib["loss_weight"])
        self.centering = str(d["centering"])
        self.self_distill = self.w_dino > 0 or self.w_ibot > 0
        backbone = StudentBackbone(
            s["arch"],
            s["kwargs"],
            drop_path_rate=s["drop_path_rate"],
            drop_path_uniform=s["drop_path_uniform"],
            pretrained=s["pretrained"],
            with_mask_token=self.w_ibot > 0,
        )
        if s["init_weights"] is not None and load_init:
            backbone.load_weights(s["init_weights"])
        dim = backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": backbone})
        head_kw = {
            "hidden_dim": d["hidden_dim"],
            "bottleneck_dim": d["bottleneck_dim"],
            "nlayers": d["nlayers"],
            "train_gain": d["train_gain"],
        }
        self.ibot_separate = bool(ib["separate_head"])
        if self.self_distill:
            self.student["dino_head"] = DINOHead(dim, d["n_prototypes"], **head_kw)
            if self.w_ibot > 0 and self.ibot_separate:
                self.student["ibot_head"] = DINOHead(dim, ib["n_prototypes"], **head_kw)
            teacher_backbone = StudentBackbone(
                s["arch"], s["kwargs"], drop_path_rate=0.0, with_mask_token=self.w_ibot > 0
            )
            self.teacher = nn.ModuleDict({"backbone": teacher_backbone})
            for k in self.student:
                if k != "backbone":
                    self.teacher[k] = DINOHead(
                        dim, self.student[k].last_layer.out_features, **head_kw
                    )
            self.teacher.load_state_dict(self.student.state_dict())
            self.teacher.requires_grad_(False)
            self.dino_loss = DINOLoss(
                d["n_prototypes"],
                student_temp=d["student_temp"],
                center_momentum=d["center_momentum"],
            )
            n_ibot = ib["n_prototypes"] if self.ibot_separate else d["n_prototypes"]
            self.ibot_loss = iBOTPatchLoss(
                n_ibot, student_temp=d["student_temp"], center_momentum=d["center_momentum"]
            )
        self.koleo_loss = KoLeoLoss()
        el = cfg["expert_loss"]
        self.expert_cls_loss = ExpertCLSLoss(el["cls_type"], el["kl_temp"])
        self.expert_patch_loss = ExpertPatchLoss(el["patch_cos_weight"], el["patch_l1_weight"])
        self.experts: list[Expert] = list(experts)  # plain list: not part of the module tree
        eh = cfg["expert_head"]
        self.student["expert_heads"] = nn.ModuleDict(
            {
                expert_key(e.name): ExpertHead(
                    dim, e.embed_dim, hidden_dim=eh["hidden_dim"], bias=eh["bias"], gain=eh["gain"]
                )
                for e in self.experts
            }
        )
        self.standardize = bool(el["standardize"])
        if self.standardize:
            self.expert_stats = nn.ModuleDict(
                {
                    f"{expert_key(e.name)}_{part}": TargetStandardizer(
                        e.embed_dim, el["standardize_momentum"]
                    )
                    for e in self.experts
                    for part in ("cls", "patch")
                }
            )
        self.n_local = int(cfg["crops"]["local_crops_number"])

    def expert_target(
        self, key: str, part: str, x: torch.Tensor, *, update: bool = False
    ) -> torch.Tensor:
        """The expert features a head is trained to predict (standardised when configured)."""
        if not self.standardize:
            return x
        stats = self.expert_stats[f"{key}_{part}"]
        if update:
            stats.update(x)
        return stats(x)

    @property
    def backbone(self) -> StudentBackbone:
        return self.student["backbone"]

    def loss_weights(self) -> dict[str, float]:
        """Weight of every named loss term this model computes."""
        w: dict[str, float] = {}
        if self.w_dino > 0:
            w["dino"] = self.w_dino
        if self.w_koleo > 0:
            w["koleo"] = self.w_koleo
        if self.w_ibot > 0:
            w["ibot"] = self.w_ibot
        for e in self.experts:
            k = expert_key(e.name)
            if e.cls_weight > 0:
                w[f"expert_{k}_cls"] = e.cls_weight
            if e.patch_weight > 0:
                w[f"expert_{k}_patch"] = e.patch_weight
        return w

    def _teacher_head(self, name: str) -> nn.Module:
        return self.teacher[name if name in self.teacher else "dino_head"]

    def forward(self, batch: dict[str, Any], *, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Compute every loss term.

        Parameters
        ----------
        batch : dict
            ``global`` (2B, 3, G, G) and ``local`` (nL*B, 3, L, L) float RGB in [0, 1], crop-major;
            ``masks`` (2B, N) bool iBOT masks.
        teacher_temp : float
            Current teacher temperature.

        Returns
        -------
        dict of str to scalar Tensor
            Named losses and ``total`` (the weighted sum, the one to back-propagate).
        """
        glob = batch["global"]
        n_glob = glob.shape[0]
        b = n_glob // 2
        x_g = normalise(glob, self.mean, self.std)
        masks = batch["masks"] if self.w_ibot > 0 else None
        s_g = self.backbone(x_g, masks)
        losses: dict[str, torch.Tensor] = {}
        if self.w_koleo > 0:
            # per global crop (never between the two crops of one tile), summed as DINOv2/GPFM do
            koleo = sum(self.koleo_loss(c) for c in s_g["cls"].chunk(2))
            losses["koleo"] = koleo if self.koleo_sum else koleo / 2
        if self.self_distill:
            with torch.no_grad():
                t_g = self.teacher["backbone"](x_g)
        if self.w_dino > 0:
            cls = [s_g["cls"]]
            local = batch.get("local")
            if local is not None and self.n_local > 0:
                cls.append(self.backbone(normalise(local, self.mean, self.std))["cls"])
            s_logits = self.student["dino_head"](torch.cat(cls))
            s_logits = s_logits.view(-1, b, s_logits.shape[-1])
            with torch.no_grad():
                t_logits = self.teacher["dino_head"](t_g["cls"])
                t_probs = self.dino_loss.teacher_targets(t_logits, teacher_temp, self.centering)
            losses["dino"] = self.dino_loss(s_logits, t_probs.view(2, b, -1))
        if self.w_ibot > 0 and masks is not None:
            head = "ibot_head" if self.ibot_separate else "dino_head"
            s_log = self.student[head](s_g["patch"][masks])
            with torch.no_grad():
                t_log = self._teacher_head(head)(t_g["patch"][masks])
                t_probs = self.ibot_loss.teacher_targets(t_log, teacher_temp, self.centering)
                per_crop = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
                weights = (1.0 / per_crop).expand_as(masks)[masks]
            losses["ibot"] = self.ibot_loss(s_log, t_probs, weights, n_glob)
        side = round(s_g["patch"].shape[1] ** 0.5)
        for e in self.experts:
            k = expert_key(e.name)
            tgt = e.targets(
                glob,
                (side, side),
                want_patch=e.patch_weight > 0,
                crop_mean=self.mean,
                crop_std=self.std,
            )
            head = self.student["expert_heads"][k]
            upd = self.training
            if e.cls_weight > 0:
                target = self.expert_target(k, "cls", tgt["cls"], update=upd)
                losses[f"expert_{k}_cls"] = self.expert_cls_loss(head(s_g["cls"]), target)
            if e.patch_weight > 0 and tgt["patch"] is not None:
                target = self.expert_target(k, "patch", tgt["patch"], update=upd)
                losses[f"expert_{k}_patch"] = self.expert_patch_loss(head(s_g["patch"]), target)
        weights = self.loss_weights()
        losses["total"] = sum(weights[k] * v for k, v in losses.items())
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher = m * teacher + (1 - m) * student`` for backbone and DINO/iBOT heads."""
        if not self.self_distill:
            return
        t_params, s_params = [], []
        for k in self.teacher:
            t_params += list(self.teacher[k].parameters())
            s_params += list(self.student[k].parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1 - momentum)

    def export_backbone(self) -> nn.Module:
        """The backbone to ship: the EMA teacher's when self-distilling, else the student's."""
        return (self.teacher["backbone"] if self.self_distill else self.backbone).model
