"""Tiny, fast, deterministic encoders for tests and demos (random weights, meaningless features).

``tiny-vit`` is a DINOv2-style ViT (patch 14, LayerScale, CLS feature after the final norm) that
exercises exactly the code path of ``gpfm`` at a size that embeds hundreds of tiles per second
on one CPU core. ``tiny-expert`` is a second, differently shaped ViT (patch 16, no LayerScale,
another width) standing in for an expert in distillation tests. LayerScale starts at 1.0 (not
1e-5) so random features still depend on the input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._meta import EncoderMeta
from gpfm_core.encoders._registry import register_encoder

if TYPE_CHECKING:
    from gpfm_core.encoders._base import Encoder

TINY_VIT_ARCH = "vit_small_patch14_dinov2"
TINY_VIT_KWARGS: dict[str, Any] = {
    "img_size": 112,
    "patch_size": 14,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "init_values": 1.0,
}
TINY_VIT_META = EncoderMeta(
    name="tiny-vit",
    family="test",
    arch=TINY_VIT_ARCH,
    embed_dim=64,
    input_px=112,
    patch_size=14,
    interpolation="bicubic",
    tile_px=112,
    tile_mpp=1.0,
    precision="fp32",
    license="BSD-3-Clause (random weights)",
    source="napari-gpfm",
    description="2-block DINOv2-style ViT/14, 64-d, seeded random weights: tests and demos only",
    weights_required=False,
)

TINY_EXPERT_ARCH = "vit_base_patch16_224"
TINY_EXPERT_KWARGS: dict[str, Any] = {
    "img_size": 112,
    "patch_size": 16,
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 2,
}
TINY_EXPERT_META = EncoderMeta(
    name="tiny-expert",
    family="test",
    arch=TINY_EXPERT_ARCH,
    embed_dim=48,
    input_px=112,
    patch_size=16,
    interpolation="bilinear",
    tile_px=112,
    tile_mpp=1.0,
    license="BSD-3-Clause (random weights)",
    source="napari-gpfm",
    description="2-block ViT/16, 48-d, seeded random weights: stands in for an expert in tests",
    weights_required=False,
)


def _build(
    meta: EncoderMeta,
    arch: str,
    base: dict[str, Any],
    *,
    pretrained: bool,
    weights: Path | None,
    seed: int,
    kw: dict[str, Any],
) -> Encoder:
    from gpfm_core.encoders._base import build_timm_encoder

    del pretrained  # nothing is published: random init unless a weights file is given
    return build_timm_encoder(
        meta, arch=arch, model_kwargs={**base, **kw}, pretrained=False, weights=weights, seed=seed
    )


@register_encoder("tiny-vit", meta=TINY_VIT_META)
def build_tiny_vit(
    *, pretrained: bool = False, weights: Path | None = None, seed: int = 0, **kw: Any
) -> Encoder:
    """Tiny DINOv2-style ViT (``weights_hash == "random-init-seed<seed>"`` unless ``weights``)."""
    return _build(
        TINY_VIT_META,
        TINY_VIT_ARCH,
        TINY_VIT_KWARGS,
        pretrained=pretrained,
        weights=weights,
        seed=seed,
        kw=kw,
    )


@register_encoder("tiny-expert", meta=TINY_EXPERT_META)
def build_tiny_expert(
    *, pretrained: bool = False, weights: Path | None = None, seed: int = 1, **kw: Any
) -> Encoder:
    """Tiny ViT/16 expert stand-in (48-d, 49 patch tokens at 112 px)."""
    return _build(
        TINY_EXPERT_META,
        TINY_EXPERT_ARCH,
        TINY_EXPERT_KWARGS,
        pretrained=pretrained,
        weights=weights,
        seed=seed,
        kw=kw,
    )
