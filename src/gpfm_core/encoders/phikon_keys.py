"""Key map between Hugging Face ``transformers`` ``ViTModel`` and timm ``VisionTransformer``.

``transformers`` stores query/key/value as three ``Linear`` layers; timm fuses them into
``attn.qkv`` (rows ordered q, k, v). Everything else is a rename::

    embeddings.cls_token                               -> cls_token
    embeddings.position_embeddings                     -> pos_embed
    embeddings.patch_embeddings.projection             -> patch_embed.proj
    encoder.layer.N.layernorm_before                   -> blocks.N.norm1
    encoder.layer.N.attention.attention.{query,key,value} -> blocks.N.attn.qkv (concatenated)
    encoder.layer.N.attention.output.dense             -> blocks.N.attn.proj
    encoder.layer.N.layernorm_after                    -> blocks.N.norm2
    encoder.layer.N.intermediate.dense                 -> blocks.N.mlp.fc1
    encoder.layer.N.output.dense                       -> blocks.N.mlp.fc2
    layernorm                                          -> norm

``pooler.*`` (dense + tanh, unused by Phikon's CLS feature) and ``embeddings.mask_token`` are
dropped; a ``vit.`` prefix (``ViTForImageClassification``) is stripped.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    import torch

__all__ = ["phikon_to_timm", "timm_to_phikon"]

_RENAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("layernorm.", "norm."),
)
_LAYER = (
    ("layernorm_before.", "norm1."),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_QKV_RE = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$"
)
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def phikon_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers`` ViTModel state dict -> timm names; timm-named dicts pass through.

    Raises
    ------
    EncoderError
        A layer lacks one of query/key/value.
    """
    import torch

    if not any(k.startswith(("embeddings.", "encoder.layer.", "vit.")) for k in sd):
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        key = key[len("vit.") :] if key.startswith("vit.") else key
        if key.startswith("pooler.") or key == "embeddings.mask_token":
            continue
        if m := _QKV_RE.match(key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        if m := _LAYER_RE.match(key):
            idx, rest = m.group(1), m.group(2)
            for src, dst in _LAYER:
                if rest.startswith(src):
                    rest = dst + rest[len(src) :]
                    break
            out[f"blocks.{idx}.{rest}"] = value
            continue
        for src, dst in _RENAMES:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        out[key] = value
    for (idx, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise EncoderError(
                f"layer {idx} has only {sorted(parts)} of query/key/value: corrupt Phikon checkpoint"
            )
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], 0
        )
    return out


def timm_to_phikon(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`phikon_to_timm` (used by tests and for exporting to ``transformers``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if m := re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            q, k, v = value.chunk(3, dim=0)
            base = f"encoder.layer.{m.group(1)}.attention.attention"
            out.update(
                {
                    f"{base}.query.{m.group(2)}": q,
                    f"{base}.key.{m.group(2)}": k,
                    f"{base}.value.{m.group(2)}": v,
                }
            )
            continue
        if m := re.match(r"^blocks\.(\d+)\.(.+)$", key):
            rest = m.group(2)
            for dst, src in _LAYER:
                if rest.startswith(src):
                    rest = dst + rest[len(src) :]
                    break
            out[f"encoder.layer.{m.group(1)}.{rest}"] = value
            continue
        for dst, src in _RENAMES:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        out[key] = value
    return out
