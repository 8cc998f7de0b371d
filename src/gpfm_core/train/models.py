"""The student backbone (a timm ViT with an iBOT mask token) and the frozen experts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpfm_core.errors import ConfigError, EncoderError, GpfmError

__all__ = ["Expert", "StudentBackbone", "load_expert", "normalise"]

log = logging.getLogger(__name__)


def normalise(x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> normalised with per-channel ``mean`` / ``std``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class StudentBackbone(nn.Module):
    """A timm ViT (``dynamic_img_size`` so global and local crops share it) plus a mask token.

    ``forward(x (B, 3, H, W) normalised, masks (B, N) bool or None)`` returns
    ``{"cls": (B, D), "patch": (B, N, D)}`` after the final norm; masked patch embeddings are
    replaced by the learnt mask token before the position embedding (iBOT).

    ``drop_path_uniform`` puts ``drop_path_rate`` in every block (DINOv2's
    ``drop_path_uniform``, as GPFM trains: 0.4 in each of the 24 blocks); otherwise timm's rule
    rises linearly from 0 to ``drop_path_rate`` (mean half of it).
    """

    def __init__(
        self,
        arch: str,
        kwargs: dict[str, Any],
        *,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        pretrained: bool = False,
        with_mask_token: bool = True,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(arch):
            raise ConfigError(
                f"student.arch {arch!r} is not a timm model: pick one from timm.list_models('vit*')"
            )
        self.arch = arch
        self.model_kwargs = {**kwargs, "dynamic_img_size": True}
        try:
            self.model = timm.create_model(
                arch,
                pretrained=pretrained,
                num_classes=0,
                drop_path_rate=drop_path_rate,
                **self.model_kwargs,
            )
        except (TypeError, RuntimeError) as exc:
            msg = " ".join(str(exc).split())[:200]
            raise ConfigError(
                f"cannot build student {arch} with {kwargs} ({msg}): fix student.kwargs"
            ) from exc
        if not hasattr(self.model, "blocks") or not hasattr(self.model, "patch_embed"):
            raise ConfigError(
                f"student.arch {arch!r} is not a ViT with blocks/patch_embed: use a timm ViT"
            )
        self.embed_dim = int(self.model.embed_dim)
        ps = self.model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 1))
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim)) if with_mask_token else None
        if drop_path_uniform and drop_path_rate > 0:
            self._uniform_drop_path(drop_path_rate)

    def _uniform_drop_path(self, rate: float) -> None:
        from timm.layers import DropPath

        for i, block in enumerate(self.model.blocks):
            if not (hasattr(block, "drop_path1") and hasattr(block, "drop_path2")):
                raise ConfigError(
                    f"student.drop_path_uniform: block {i} of {self.arch} has no drop_path1/"
                    "drop_path2: set student.drop_path_uniform=false"
                )
            block.drop_path1 = DropPath(rate)
            block.drop_path2 = DropPath(rate)

    def load_weights(self, path: str | Path) -> None:
        """Start from a pretrained backbone, loaded strictly (every tensor, every shape).

        Accepts GPFM's / DINOv2's training layout (``{"teacher": {"backbone.blocks.<chunk>.<i>.*",
        "backbone.mask_token", "dino_head.*"}}``, BlockChunk keys flattened, heads dropped),
        timm / Hugging Face state dicts and ``gpfm export`` safetensors. A ``mask_token`` in the
        file initialises the iBOT mask token.

        Raises
        ------
        ConfigError
            The file is missing, unreadable or does not fit ``student.arch`` / ``kwargs``
            (one line naming ``student.init_weights``).
        """
        from gpfm_core.encoders._checkpoint import (
            convert_dinov2_chunks,
            load_checkpoint_file,
            load_state_dict_strict,
        )

        p = Path(path).expanduser()
        try:
            sd = load_checkpoint_file(p)
            mask = sd.pop("mask_token", None)
            load_state_dict_strict(self.model, convert_dinov2_chunks(sd), source=str(p))
        except EncoderError as exc:
            raise ConfigError(f"student.init_weights: {exc}") from None
        if mask is not None and self.mask_token is not None:
            if tuple(mask.shape) != tuple(self.mask_token.shape):
                raise ConfigError(
                    f"student.init_weights {p}: mask_token {tuple(mask.shape)} does not fit "
                    f"{tuple(self.mask_token.shape)}: pass a checkpoint of this architecture"
                )
            with torch.no_grad():
                self.mask_token.copy_(mask)
        log.info("student initialised from %s", p)

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    def forward(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        m = self.model
        tok = m.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
        if masks is not None and self.mask_token is not None:
            b, h, w, d = tok.shape
            tok = torch.where(
                masks.view(b, h, w, 1), self.mask_token.to(tok.dtype).view(1, 1, 1, d), tok
            )
        tok = m._pos_embed(tok)
        tok = m.patch_drop(tok)
        tok = m.norm_pre(tok)
        tok = m.blocks(tok)
        tok = m.norm(tok)
        return {"cls": tok[:, 0], "patch": tok[:, self.num_prefix_tokens :]}


@dataclass
class Expert:
    """A frozen expert encoder, its distillation weights, what it sees and what it predicts.

    ``input``: ``crop`` feeds it the student's global crop exactly as the student sees it (its
    size, the student's mean/std; GPFM feeds all three experts the DINOv2 crops, normalised with
    ImageNet mean/std, ``ssl_meta_arch.py`` ``get_distill_teacher_output``); ``native`` resizes
    the crop to the expert's ``input_px`` and uses its own mean/std. ``target``: ``embedding``
    is the encoder's feature; ``contrastive`` its projected, L2-normalised contrastive embedding
    (CONCH: ``encode_image(x, proj_contrast=True, normalize=True)``, GPFM's ``fms.py``).
    """

    name: str
    encoder: nn.Module
    cls_weight: float
    patch_weight: float
    input: str = "native"
    target: str = "embedding"

    @property
    def embed_dim(self) -> int:
        """Dimension of the target the head predicts."""
        if self.target == "contrastive":
            return int(self.encoder.contrastive_dim)
        return int(self.encoder.meta.embed_dim)

    @torch.no_grad()
    def targets(
        self,
        crops: torch.Tensor,
        grid: tuple[int, int],
        *,
        want_patch: bool,
        crop_mean: Any = None,
        crop_std: Any = None,
    ) -> dict[str, torch.Tensor | None]:
        """Expert features of student crops.

        Parameters
        ----------
        crops : (B, 3, H, W) float RGB in [0, 1]
            The student's (unmasked) global crops.
        grid : (rows, cols)
            The student's patch grid; the expert's patch grid is resized to it (bicubic).
        crop_mean, crop_std : 3 floats
            The student's normalisation (used with ``input`` ``crop``).

        Returns
        -------
        dict
            ``cls`` (B, E); ``patch`` (B, rows*cols, E) or None.
        """
        meta = self.encoder.meta
        x = crops
        if self.input == "crop":
            if crop_mean is None or crop_std is None:
                raise ValueError(f"expert {self.name}: input 'crop' needs crop_mean and crop_std")
            x = normalise(x, crop_mean, crop_std)
        else:
            if x.shape[-1] != meta.input_px or x.shape[-2] != meta.input_px:
                x = F.interpolate(
                    x,
                    size=(meta.input_px, meta.input_px),
                    mode="bicubic",
                    align_corners=False,
                    antialias=True,
                )
            x = normalise(x.clamp(0, 1), meta.mean, meta.std)
        if self.target == "contrastive":
            return {"cls": self.encoder.forward_contrastive(x).float(), "patch": None}
        out = self.encoder.forward_tokens(x)
        patch = out.get("patch") if want_patch else None
        if patch is not None:
            b, n, e = patch.shape
            side = round(n**0.5)
            if side * side != n:
                raise EncoderError(
                    f"expert {self.name}: {n} patch tokens do not form a square grid; set its patch weight to 0"
                )
            p = patch.transpose(1, 2).reshape(b, e, side, side).float()
            if (side, side) != tuple(grid):
                p = F.interpolate(p, size=grid, mode="bicubic", align_corners=False)
            patch = p.flatten(2).transpose(1, 2)
        return {"cls": out["cls"].float(), "patch": patch}


def load_expert(spec: dict[str, Any], *, device: torch.device) -> Expert:
    """Build one frozen expert from an ``experts`` config item.

    Raises
    ------
    EncoderError
        The expert cannot be built or its weights are unavailable (one line naming it).
    """
    name = spec["name"]
    try:
        from gpfm_core.encoders import create_encoder
    except ImportError as exc:
        raise EncoderError(f"expert {name!r}: the encoder registry is unavailable ({exc})") from exc
    try:
        enc = create_encoder(name, pretrained=spec["pretrained"], device=str(device))
    except GpfmError as exc:
        raise EncoderError(f"expert {name!r} cannot be loaded: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:300]
        raise EncoderError(
            f"expert {name!r} cannot be loaded ({msg}): fix or remove it in 'experts'"
        ) from None
    enc.eval().requires_grad_(False)
    w = spec["weights"]
    if w["patch"] > 0 and getattr(enc.meta, "patch_size", None) is None:
        raise EncoderError(f"expert {name!r} has no patch tokens: set its patch weight to 0")
    target = spec.get("target", "embedding")
    if target == "contrastive":
        if not hasattr(enc, "forward_contrastive"):
            raise EncoderError(
                f"expert {name!r} has no contrastive projection: set its target to embedding"
            )
        if w["patch"] > 0:
            raise EncoderError(
                f"expert {name!r}: a contrastive target has no patch tokens: set its patch weight to 0"
            )
    expert = Expert(
        name=name,
        encoder=enc,
        cls_weight=w["cls"],
        patch_weight=w["patch"],
        input=spec.get("input", "native"),
        target=target,
    )
    log.info(
        "expert %s: %s target, dim %d, input %s (%d px native)",
        name,
        target,
        expert.embed_dim,
        expert.input,
        enc.meta.input_px,
    )
    return expert
