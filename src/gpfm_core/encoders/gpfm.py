"""GPFM exactly as published (Ma et al., "Towards a generalizable pathology foundation model via
unified knowledge distillation"; github.com/birkhoffkiki/GPFM).

Network: DINOv2 ViT-L/14 (original DINOv2 code) — 224 px input, patch 14, width 1024, depth 24,
16 heads, MLP ratio 4 with plain GELU MLP, LayerScale (init 1e-5), no registers, LayerNorm eps
1e-6, ``pos_embed`` ``[1, 257, 1024]``. Feature: the CLS token after the final norm (1024-d).
That is timm's ``vit_large_patch14_dinov2`` built with ``img_size=224, init_values=1e-5,
num_classes=0`` (same parameter names: ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,
attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``, ``cls_token``, ``pos_embed``).

Published checkpoints, both loaded:

1. GitHub release ``GPFM.pth``: ``{"teacher": {"backbone.*", "dino_head.*"}}`` with blocks in
   DINOv2's ``BlockChunk`` layout (4 chunks of 6, GLOBAL indices: ``backbone.blocks.1.6.*``)
   and a ``backbone.mask_token`` — heads and the mask token are dropped, chunks flattened.
2. Hugging Face ``majiabo/GPFM`` ``GPFM.pth``: a bare timm state dict.

Preprocessing: bicubic resize to 224, ImageNet mean/std. Default tiling follows the authors:
512 px at 0.25 µm/px (40x) resized to 224, a 128 µm field of view.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._meta import IMAGENET_MEAN, IMAGENET_STD, EncoderMeta
from gpfm_core.encoders._registry import register_encoder

if TYPE_CHECKING:
    import torch

    from gpfm_core.encoders._base import Encoder

GPFM_ARCH = "vit_large_patch14_dinov2"
GPFM_KWARGS: dict[str, Any] = {"img_size": 224, "init_values": 1e-5}

GPFM_META = EncoderMeta(
    name="gpfm",
    family="gpfm",
    arch=GPFM_ARCH,
    embed_dim=1024,
    input_px=224,
    patch_size=14,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bicubic",
    tile_px=512,
    tile_mpp=0.25,
    precision="bf16",
    license="CC BY-NC-ND 4.0 (non-commercial, as stated by the GPFM authors)",
    source="https://github.com/birkhoffkiki/GPFM (HF: majiabo/GPFM)",
    description="GPFM: DINOv2 ViT-L/14, unified knowledge distillation from expert models; CLS, 1024-d",
    weights_required=True,
    hf_repo="majiabo/GPFM",
    hf_filename="GPFM.pth",
)


def adapt_dinov2_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-DINOv2 backbone keys -> timm ``VisionTransformer`` keys.

    Drops ``mask_token`` (training only) and flattens ``BlockChunk`` keys; bare timm dicts pass
    through unchanged. Input is an already unwrapped state dict (no ``teacher.``/``backbone.``).
    """
    from gpfm_core.encoders._checkpoint import convert_dinov2_chunks, drop_keys

    return convert_dinov2_chunks(drop_keys(sd, exact=("mask_token",)))


@register_encoder("gpfm", meta=GPFM_META)
def build_gpfm(
    *, pretrained: bool = True, weights: Path | None = None, seed: int = 0, **kw: Any
) -> Encoder:
    """Build GPFM; ``weights`` may be either published layout (``.pth``) or ``.safetensors``.

    ``**kw`` overrides ``timm.create_model`` arguments (e.g. ``depth=4, embed_dim=64,
    num_heads=2`` for fast tests of this exact code path).
    """
    from gpfm_core.encoders._base import build_timm_encoder

    return build_timm_encoder(
        GPFM_META,
        arch=GPFM_ARCH,
        model_kwargs={**GPFM_KWARGS, **kw},
        pretrained=pretrained,
        weights=weights,
        adapter=adapt_dinov2_state_dict,
        seed=seed,
    )
