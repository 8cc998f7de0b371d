"""CONCH through its authors' ``conch`` package (optional dependency, imported lazily).

The model skeleton comes from ``conch.open_clip_custom.create_model_from_pretrained`` without a
checkpoint; the weights are read by this project's safe loader (``weights_only``) and loaded
strictly, so the authors' loader never unpickles the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpfm_core.encoders._base import Encoder
from gpfm_core.encoders._checkpoint import file_sha256, load_checkpoint_file, load_state_dict_strict
from gpfm_core.encoders._hub import resolve_weights
from gpfm_core.encoders._meta import EncoderMeta
from gpfm_core.errors import EncoderError


class ConchEncoder(Encoder):
    """CONCH image tower: ``encode_image(x, proj_contrast=False, normalize=False)`` -> ``(B, 512)``.

    :meth:`forward_contrastive` gives the embedding in CONCH's image-text space instead
    (attentional pool -> LayerNorm -> ``proj_contrast``, L2-normalised): what GPFM distils
    (its ``pretrain/dinov2/fms.py``: ``CONCH.forward``).
    """

    @property
    def contrastive_dim(self) -> int:
        """Width of :meth:`forward_contrastive` (512: ``proj_contrast`` is 512x512)."""
        return int(self.model.visual.proj_contrast.shape[-1])

    def forward_contrastive(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised -> ``(B, 512)`` projected, unit-norm image embedding."""
        self._check_input(x)
        return self.model.encode_image(x, proj_contrast=True, normalize=True)

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``{"cls": (B, 512), "patch": None}`` (CONCH's pooled feature has no patch grid)."""
        return {"cls": self.forward(x), "patch": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


def build_conch_encoder(
    meta: EncoderMeta, *, pretrained: bool, weights: Path | None, seed: int = 0, **kw: Any
) -> Encoder:
    """Build CONCH; see the module docstring."""
    if kw:
        raise EncoderError(f"the CONCH encoder takes no architecture overrides, got {sorted(kw)}")
    from conch.open_clip_custom import create_model_from_pretrained

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=None)
    if not (pretrained or weights is not None):
        return ConchEncoder(model, meta, weights_hash=f"random-init-seed{seed}", arch=meta.arch)
    path = resolve_weights(meta, weights)
    load_state_dict_strict(model, load_checkpoint_file(path), source=str(path))
    return ConchEncoder(model, meta, weights_hash=file_sha256(path), arch=meta.arch)


def conch_shaped_model(
    *,
    width: int = 768,
    depth: int = 12,
    heads: int = 12,
    dim: int = 512,
    pool_heads: int = 8,
    caption_queries: int = 256,
) -> torch.nn.Module:
    """A CoCa model with CONCH's image tower shape and random weights, for tests and benchmarks.

    ``model.visual`` has the parameter names of ``conch`` 0.1.0's ``VisualModel``: a timm
    ViT/16 ``trunk`` at 448 px with dynamic size (``width`` wide, ``depth`` blocks), the
    contrastive attentional pool (1 query, ``dim`` wide) -> ``ln_contrast`` ->
    ``proj_contrast`` (``dim`` x ``dim``), and, unless ``caption_queries`` is 0, the caption
    pool (``caption_queries`` queries) and ``ln_caption`` that CONCH's projected
    ``encode_image`` also runs. The defaults are CONCH's sizes (90.4 M parameters); the text towers are left out.
    ``model.encode_image(images, normalize=True, proj_contrast=True)`` follows CoCa's contract:
    ``(B, dim)``, projected and L2-normalised, or the bare pooled feature with
    ``proj_contrast=False``. Wrap it in :class:`ConchEncoder` to use it as an expert.
    """
    import timm
    import torch.nn.functional as F
    from torch import nn

    class AttentionalPooler(nn.Module):
        """CoCa's attentional pooler: learnt queries cross-attend to the trunk's tokens."""

        def __init__(self, d_model: int, context_dim: int, n_queries: int) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.attn = nn.MultiheadAttention(
                d_model, pool_heads, kdim=context_dim, vdim=context_dim, batch_first=True
            )
            self.ln_q, self.ln_k = nn.LayerNorm(d_model), nn.LayerNorm(context_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.ln_k(x)
            q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
            return self.attn(q, x, x, need_weights=False)[0]

    class VisualModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = timm.create_model(
                "vit_base_patch16_224",
                img_size=448,
                embed_dim=width,
                depth=depth,
                num_heads=heads,
                num_classes=0,
                dynamic_img_size=True,
            )
            self.attn_pool_contrast = AttentionalPooler(dim, width, 1)
            self.ln_contrast = nn.LayerNorm(dim)
            self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(dim, dim))
            if caption_queries:
                self.attn_pool_caption = AttentionalPooler(width, width, caption_queries)
                self.ln_caption = nn.LayerNorm(width)

        def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

        def forward_no_head(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            pooled = self._pool(self.trunk.forward_features(x))
            return F.normalize(pooled, dim=-1) if normalize else pooled

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.trunk.forward_features(x)
            if caption_queries:  # CONCH's forward computes the caption tokens too
                self.ln_caption(self.attn_pool_caption(tokens))
            return self._pool(tokens) @ self.proj_contrast

    class CocaShaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = VisualModel()

        def encode_image(
            self, images: torch.Tensor, normalize: bool = True, proj_contrast: bool = True
        ) -> torch.Tensor:
            if not proj_contrast:
                return self.visual.forward_no_head(images, normalize=normalize)
            z = self.visual(images)
            return F.normalize(z, dim=-1) if normalize else z

    return CocaShaped()
