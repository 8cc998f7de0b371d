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
