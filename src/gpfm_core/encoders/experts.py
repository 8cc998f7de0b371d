"""Expert encoders, built the way their authors publish them.

* ``uni`` — MahmoodLab/UNI: timm ``vit_large_patch16_224`` (``img_size=224, patch_size=16,
  init_values=1e-5, num_classes=0, dynamic_img_size=True``); CLS after the final norm, 1024-d;
  224 px at 20x (0.5 µm/px); ImageNet mean/std; weights ``pytorch_model.bin`` in the gated HF
  repo ``MahmoodLab/UNI``; CC BY-NC-ND 4.0.
* ``phikon`` — owkin/phikon: iBOT ViT-B/16 published as a Hugging Face ``transformers``
  ``ViTModel``; feature = CLS of ``last_hidden_state`` (after the final LayerNorm), 768-d.
  Built here as timm ``vit_base_patch16_224`` with LayerNorm eps 1e-12 (``ViTConfig``'s
  ``layer_norm_eps``, which Phikon keeps) and a key map from the ``transformers`` names
  (``phikon_keys.py``); 224 px at 20x; ImageNet mean/std; Owkin non-commercial licence.
* ``conch`` — MahmoodLab/CONCH: CoCa ViT-B/16 vision tower at 448 px with its own open_clip-based
  code; feature = ``encode_image(x, proj_contrast=False, normalize=False)`` (512-d). Needs the
  optional ``conch`` package; without it building raises :class:`EncoderError` (meta still listed).
  ``forward_contrastive`` gives the projected, L2-normalised image embedding that GPFM distils.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._meta import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderMeta,
)
from gpfm_core.encoders._registry import register_encoder
from gpfm_core.encoders.phikon_keys import phikon_to_timm
from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    from gpfm_core.encoders._base import Encoder

UNI_ARCH = "vit_large_patch16_224"
UNI_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "dynamic_img_size": True,
}
UNI_META = EncoderMeta(
    name="uni",
    family="uni",
    arch=UNI_ARCH,
    embed_dim=1024,
    input_px=224,
    patch_size=16,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bilinear",
    tile_px=224,
    tile_mpp=0.5,
    precision="bf16",
    license="CC BY-NC-ND 4.0 (non-commercial, gated on Hugging Face)",
    source="https://github.com/mahmoodlab/UNI (HF: MahmoodLab/UNI)",
    description="UNI: DINOv2 ViT-L/16 trained on Mass-100K; CLS feature, 1024-d",
    hf_repo="MahmoodLab/UNI",
    hf_filename="pytorch_model.bin",
)

PHIKON_ARCH = "vit_base_patch16_224"
PHIKON_LN_EPS = 1e-12
PHIKON_META = EncoderMeta(
    name="phikon",
    family="phikon",
    arch=PHIKON_ARCH,
    embed_dim=768,
    input_px=224,
    patch_size=16,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bilinear",
    tile_px=224,
    tile_mpp=0.5,
    precision="fp32",
    license="Owkin non-commercial licence",
    source="https://huggingface.co/owkin/phikon",
    description="Phikon: iBOT ViT-B/16 trained on 40M TCGA tiles; CLS feature, 768-d",
    hf_repo="owkin/phikon",
    hf_filename="pytorch_model.bin",
)

CONCH_META = EncoderMeta(
    name="conch",
    family="conch",
    arch="conch_ViT-B-16 (CoCa vision tower)",
    embed_dim=512,
    input_px=448,
    patch_size=16,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    interpolation="bicubic",
    tile_px=512,
    tile_mpp=0.5,
    precision="fp32",
    license="CC BY-NC-ND 4.0 (non-commercial, gated on Hugging Face)",
    source="https://github.com/mahmoodlab/CONCH (HF: MahmoodLab/CONCH)",
    description="CONCH: vision-language CoCa ViT-B/16 image tower; needs the `conch` package; 512-d",
    hf_repo="MahmoodLab/CONCH",
    hf_filename="pytorch_model.bin",
)
CONCH_INSTALL = "pip install git+https://github.com/Mahmoodlab/CONCH"


@register_encoder("uni", meta=UNI_META)
def build_uni(
    *, pretrained: bool = True, weights: Path | None = None, seed: int = 0, **kw: Any
) -> Encoder:
    """UNI exactly as its model card builds it with timm."""
    from gpfm_core.encoders._base import build_timm_encoder

    return build_timm_encoder(
        UNI_META,
        arch=UNI_ARCH,
        model_kwargs={**UNI_KWARGS, **kw},
        pretrained=pretrained,
        weights=weights,
        seed=seed,
    )


@register_encoder("phikon", meta=PHIKON_META)
def build_phikon(
    *, pretrained: bool = True, weights: Path | None = None, seed: int = 0, **kw: Any
) -> Encoder:
    """Phikon as a timm ViT-B/16 (LayerNorm eps 1e-12) loading ``transformers`` ViTModel weights.

    Both ``transformers`` names and timm names are accepted in the checkpoint.
    """
    from functools import partial

    from torch import nn

    from gpfm_core.encoders._base import build_timm_encoder

    enc = build_timm_encoder(
        PHIKON_META,
        arch=PHIKON_ARCH,
        model_kwargs={"norm_layer": partial(nn.LayerNorm, eps=PHIKON_LN_EPS), **kw},
        pretrained=pretrained,
        weights=weights,
        adapter=phikon_to_timm,
        seed=seed,
    )
    enc.model_kwargs = {k: v for k, v in enc.model_kwargs.items() if k != "norm_layer"}
    return enc


def conch_available() -> bool:
    """True when the optional ``conch`` package can be imported."""
    return importlib.util.find_spec("conch") is not None


def _conch_status() -> str:
    if not conch_available():
        return "needs package conch"
    from gpfm_core.encoders._hub import find_local_weights

    try:
        return "available" if find_local_weights(CONCH_META) is not None else "needs weights"
    except EncoderError:
        return "needs weights (env path missing)"


@register_encoder("conch", meta=CONCH_META)
def build_conch(*, pretrained: bool = True, weights: Path | None = None, **kw: Any) -> Encoder:
    """CONCH's image tower via the authors' ``conch`` package (weights loaded safely here)."""
    if not conch_available():
        raise EncoderError(f"the CONCH encoder needs its authors' code: {CONCH_INSTALL}")
    from gpfm_core.encoders._conch import build_conch_encoder

    return build_conch_encoder(CONCH_META, pretrained=pretrained, weights=weights, **kw)


build_conch.weights_status = _conch_status  # type: ignore[attr-defined]
