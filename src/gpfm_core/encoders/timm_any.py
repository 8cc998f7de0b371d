"""``"timm:<model>"``: any timm model as a feature extractor (``num_classes=0``).

Weights come only from a local file (``weights=``, a timm-format state dict in
``.safetensors``/``.pth``/``.bin``) — never from the network. ``pretrained=False`` gives a seeded
random initialisation. Preprocessing (input size, mean/std, interpolation) comes from the timm
``pretrained_cfg``; the default tiling is ``input_px`` pixels at 0.5 µm/px (20x) unless overridden.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._meta import EncoderMeta
from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    from torch import nn

    from gpfm_core.encoders._base import Encoder

__all__ = ["build_timm_any", "meta_from_timm_model"]

_INTERP = {"bicubic", "bilinear", "nearest"}


def meta_from_timm_model(model: nn.Module, *, name: str, arch: str, **changes: Any) -> EncoderMeta:
    """Derive an :class:`EncoderMeta` from a built timm model's ``pretrained_cfg``.

    Works on ``meta``-device models (only configuration is read).
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None) if pe is not None else None
    input_px = int(img[0]) if img is not None else int(cfg.get("input_size", (3, 224, 224))[-1])
    patch = int(pe.patch_size[0]) if pe is not None and getattr(pe, "patch_size", None) else None
    interp = str(cfg.get("interpolation", "bicubic"))
    fields: dict[str, Any] = {
        "name": name,
        "family": "timm",
        "arch": arch,
        "embed_dim": int(model.num_features),
        "input_px": input_px,
        "patch_size": patch,
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        "interpolation": interp if interp in _INTERP else "bicubic",
        "tile_px": input_px,
        "tile_mpp": 0.5,
        "license": str(cfg.get("license", "see the timm model card")),
        "source": f"timm {arch}" + (f" ({cfg['hf_hub_id']})" if cfg.get("hf_hub_id") else ""),
        "description": f"timm {arch} feature extractor (num_classes=0)",
        "weights_required": True,
    }
    fields.update(changes)
    return EncoderMeta(**fields)


def build_timm_any(
    *,
    timm_name: str,
    pretrained: bool = True,
    weights: Path | None = None,
    seed: int = 0,
    **kw: Any,
) -> Encoder:
    """Build ``timm:<timm_name>``; ``pretrained`` requires a local ``weights`` file.

    ``**kw`` goes to ``timm.create_model`` (e.g. ``img_size=224``).
    """
    import torch

    from gpfm_core.encoders._base import build_timm_encoder, create_timm_model
    from gpfm_core.encoders.gpfm import adapt_dinov2_state_dict

    if not timm_name:
        raise EncoderError("'timm:' needs a model name, e.g. 'timm:vit_small_patch16_224'")
    if pretrained and weights is None:
        raise EncoderError(
            f"timm:{timm_name} loads weights only from a local file (no downloads): pass "
            f"weights=PATH (CLI: gpfm embed --encoder timm:{timm_name} --weights FILE), "
            "or pretrained=False for random weights"
        )
    with torch.device("meta"):
        skeleton = create_timm_model(timm_name, kw, seed=seed)
    meta = meta_from_timm_model(skeleton, name=f"timm:{timm_name}", arch=timm_name)
    adapter = adapt_dinov2_state_dict if timm_name.startswith(("vit_", "eva")) else None
    return build_timm_encoder(
        meta,
        arch=timm_name,
        model_kwargs=kw,
        pretrained=False,
        weights=weights,
        adapter=adapter,
        seed=seed,
    )
