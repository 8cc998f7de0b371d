"""``hed-texture``: a training-free stain-texture descriptor, as an encoder like any other.

The kind of features QuPath's pixel and object classifiers compute when there is no deep
model: colour deconvolution into haematoxylin and eosin (Ruifrok & Johnston's stain vectors),
each stain rescaled by its spread within the tile (so a paler or darker stain changes little),
then a fixed filter bank — Gaussian, Laplacian of Gaussian and four Gabor orientations — on a
four-level pyramid (Gaussian sigma 1, 2, 4 and 8 px, Gabor wavelengths 3 to 24 px at the
input resolution). Per 16 px cell the mean and standard deviation
of every absolute response form a patch token; the same over the whole tile is the global
feature (96-d, log-compressed). No weights, no download, deterministic; about 35 tiles/s of
224 px on one CPU core (the filter bank is a plain convolution).

Use it as a baseline (``gpfm embed --encoder hed-texture``) and as a frozen *expert* for
distillation when no pretrained pathology model is at hand: the shipped ``gpfm-student`` is
distilled from it (see its model card). Features are texture statistics, not morphology a
foundation model has learnt: expect them to separate tissue textures, not subtle classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._meta import EncoderMeta
from gpfm_core.encoders._registry import register_encoder

if TYPE_CHECKING:
    from gpfm_core.encoders._base import Encoder

__all__ = ["HED_TEXTURE_META"]

#: Stains x pyramid levels x kernels x (mean, std).
_STAINS, _LEVELS, _KERNELS = 2, 4, 6
_DIM = _STAINS * _LEVELS * _KERNELS * 2

HED_TEXTURE_META = EncoderMeta(
    name="hed-texture",
    family="handcrafted",
    arch="hed-texture (colour deconvolution + Gaussian/LoG/Gabor filter bank, 4 levels)",
    embed_dim=_DIM,
    input_px=224,
    patch_size=16,
    mean=(0.0, 0.0, 0.0),  # works on RGB in [0, 1]: optical density needs raw intensities
    std=(1.0, 1.0, 1.0),
    interpolation="bilinear",
    tile_px=224,
    tile_mpp=0.5,
    precision="fp32",
    license="BSD-3-Clause (no weights)",
    source="napari-gpfm",
    description="training-free H&E stain-texture features (QuPath-style baseline, distillation expert)",
    weights_required=False,
)


def _build_module() -> Any:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    def kernel_bank(sigma: float = 1.0) -> np.ndarray:
        r = int(np.ceil(3 * sigma))
        y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
        g = np.exp(-(x**2 + y**2) / (2 * sigma**2))
        g /= g.sum()
        log = (x**2 + y**2 - 2 * sigma**2) / sigma**2 * g
        bank = [g, log - log.mean()]
        for theta in np.arange(4) * np.pi / 4:  # Gabor, wavelength 3 sigma
            along = x * np.cos(theta) + y * np.sin(theta)
            gab = g * np.cos(2 * np.pi * along / (3 * sigma))
            bank.append(gab - gab.mean())
        return np.stack(bank)[:, None].astype(np.float32)  # (6, 1, k, k)

    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    rgb_from_hed /= np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
    hed_from_rgb = np.linalg.inv(rgb_from_hed).astype(np.float32)

    class HedTexture(nn.Module):
        """``forward_features(x (B, 3, H, W) RGB in [0, 1]) -> (B, 1 + h*w, 96)`` tokens.

        Token 0 is the whole-tile feature, then one token per 16 x 16 px cell, row-major
        (``h = H // 16``). Any H, W that are multiples of 16 work.
        """

        num_prefix_tokens = 1
        dynamic_img_size = True
        cell = 16

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("hed_from_rgb", torch.from_numpy(hed_from_rgb))
            self.register_buffer("bank", torch.from_numpy(kernel_bank()))

        def _responses(self, x: torch.Tensor) -> list[torch.Tensor]:
            od = -torch.log(x.float().clamp(1.0 / 255.0, 1.0))
            stains = torch.einsum("bchw,cd->bdhw", od, self.hed_from_rgb)[:, :_STAINS]
            # divide by each stain's spread in the tile: robust to stain strength, keeps texture
            spread = stains.flatten(2).std(dim=2).clamp_min(1e-3)[..., None, None]
            img = (stains / spread).flatten(0, 1)[:, None]  # (B*2, 1, H, W)
            out, pad = [], self.bank.shape[-1] // 2
            for level in range(_LEVELS):
                if level:
                    img = F.avg_pool2d(img, 2)
                out.append(F.conv2d(F.pad(img, (pad,) * 4, mode="reflect"), self.bank).abs())
            return out

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            b, _, h, w = x.shape
            cells, glob = [], []
            for level, resp in enumerate(self._responses(x)):
                k = max(1, self.cell >> level)
                mean = F.avg_pool2d(resp, k)
                sq = F.avg_pool2d(resp * resp, k)
                std = (sq - mean * mean).clamp_min(0).sqrt()
                cells += [mean, std]
                glob += [resp.mean(dim=(2, 3)), resp.flatten(2).std(dim=2)]
            grid = (h // self.cell, w // self.cell)
            patch = torch.cat(
                [c[..., : grid[0], : grid[1]].reshape(b, -1, *grid) for c in cells], dim=1
            )
            tokens = torch.log1p(patch.flatten(2).transpose(1, 2))
            cls = torch.log1p(torch.cat([g.reshape(b, -1) for g in glob], dim=1))
            return torch.cat([cls[:, None], tokens], dim=1)

        def forward_head(self, feats: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
            del pre_logits
            return feats[:, 0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(x))

    return HedTexture()


@register_encoder("hed-texture", meta=HED_TEXTURE_META)
def build_hed_texture(
    *, pretrained: bool = True, weights: Path | None = None, seed: int = 0, **kw: Any
) -> Encoder:
    """The descriptor (no weights: ``pretrained``, ``weights`` and ``seed`` change nothing)."""
    from gpfm_core.encoders._base import Encoder
    from gpfm_core.errors import EncoderError

    del pretrained, seed
    if weights is not None or kw:
        raise EncoderError(
            f"hed-texture has no weights or options (got weights={weights}, {sorted(kw)})"
        )
    return Encoder(_build_module().eval(), HED_TEXTURE_META, weights_hash="handcrafted")
