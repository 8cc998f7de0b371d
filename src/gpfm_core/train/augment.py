"""DINOv2 multi-crop augmentation for H&E tiles, seeded per sample.

Two global crops (scale 0.32-1) and N local crops (scale 0.05-0.32), each resized bicubic,
flipped, colour-jittered, turned grey, blurred and (second global crop) solarised, as GPFM's
``pretrain/dinov2/data/augmentations.py`` (``DataAugmentationDINO``); 90° rotations and HED
stain jitter are opt-in (GPFM does not use them). Every random draw comes from
``numpy.random.default_rng(key)`` with a key built from (seed, step, sample index), so a crop
depends only on where it sits in the run: a resumed run or a run on more workers sees exactly
the same crops.

``blur_p`` is the probability that a crop IS blurred. GPFM configures ``GaussianBlur(p=1.0)``,
``(p=0.1)`` and ``(p=0.5)``, but its wrapper (``data/transforms.py``) passes ``1 - p`` to
``RandomApply``, which applies with that probability: as run, the first global crop is never
blurred, the second 90 % of the time, locals half the time. The defaults are what was run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MultiCropAugment", "hed_jitter"]

# Ruifrok & Johnston stain vectors (rows: H, E, DAB), as in skimage.color.rgb2hed.
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def hed_jitter(img: Any, alpha: np.ndarray, beta: np.ndarray) -> Any:
    """Perturb stain concentrations: ``hed' = hed * alpha + beta``.

    Parameters
    ----------
    img : torch.Tensor
        (3, H, W) float RGB in [0, 1].
    alpha, beta : (3,) float arrays
        Per-stain scale (around 1) and shift (around 0).

    Returns
    -------
    torch.Tensor
        (3, H, W) float RGB in [0, 1].
    """
    import torch

    eps = 1e-6
    od = -torch.log(img.clamp_min(eps))  # optical density (3, H, W)
    hed = torch.einsum("chw,cd->dhw", od, torch.from_numpy(_HED_FROM_RGB))
    hed = (
        hed * torch.from_numpy(alpha.astype(np.float32))[:, None, None]
        + torch.from_numpy(beta.astype(np.float32))[:, None, None]
    )
    od2 = torch.einsum("dhw,dc->chw", hed, torch.from_numpy(_RGB_FROM_HED))
    return torch.exp(-od2).clamp(0.0, 1.0)


@dataclass
class MultiCropAugment:
    """Callable ``(tile uint8 (H, W, 3), key) -> {"global": [(3,G,G)]*2, "local": [(3,L,L)]*n}``.

    Crops are float32 RGB in [0, 1], not normalised (the student and each expert normalise
    with their own mean/std).
    """

    global_crops_size: int = 224
    global_crops_scale: Sequence[float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 98
    local_crops_scale: Sequence[float] = (0.05, 0.32)
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    rot90: bool = False
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    hed_jitter_p: float = 0.0
    hed_sigma: float = 0.05
    blur_p: Sequence[float] = (0.0, 0.9, 0.5)
    blur_sigma: Sequence[float] = (0.1, 2.0)
    blur_kernel_size: int | None = 9
    solarize_p: float = 0.2

    @classmethod
    def from_config(cls, crops: dict[str, Any]) -> MultiCropAugment:
        """Build from the ``crops`` section of the training config."""
        return cls(**crops)

    def _crop(self, rng: np.random.Generator, img: Any, size: int, scale: Sequence[float]) -> Any:
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode

        _, h, w = img.shape
        area = h * w
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            ratio = math.exp(rng.uniform(*log_ratio))
            cw = round(math.sqrt(target * ratio))
            ch = round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(rng.integers(0, h - ch + 1))
                left = int(rng.integers(0, w - cw + 1))
                break
        else:  # central crop fallback, as torchvision
            ch = cw = min(h, w)
            top, left = (h - ch) // 2, (w - cw) // 2
        if self.interpolation == "bilinear":
            return F.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        out = F.resized_crop(
            img,
            top,
            left,
            ch,
            cw,
            [size, size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        return out.clamp_(0.0, 1.0)  # bicubic overshoots; PIL saturates at 0 and 255

    def _photometric(
        self, rng: np.random.Generator, img: Any, blur_p: float, solarize_p: float
    ) -> Any:
        import torch
        import torchvision.transforms.v2.functional as F

        if rng.random() < self.flip_p:
            img = F.horizontal_flip(img)
        if self.rot90:
            img = torch.rot90(img, int(rng.integers(0, 4)), dims=(1, 2))
        if rng.random() < self.color_jitter_p:
            ops = rng.permutation(4)
            b = rng.uniform(1 - self.brightness, 1 + self.brightness)
            c = rng.uniform(1 - self.contrast, 1 + self.contrast)
            s = rng.uniform(1 - self.saturation, 1 + self.saturation)
            hh = rng.uniform(-self.hue, self.hue)
            for op in ops:
                if op == 0 and self.brightness:
                    img = F.adjust_brightness(img, b)
                elif op == 1 and self.contrast:
                    img = F.adjust_contrast(img, c)
                elif op == 2 and self.saturation:
                    img = F.adjust_saturation(img, s)
                elif op == 3 and self.hue:
                    img = F.adjust_hue(img, hh)
        # drawn only when enabled, so configs without it keep their random stream
        if self.grayscale_p > 0 and rng.random() < self.grayscale_p:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if rng.random() < self.hed_jitter_p and self.hed_sigma > 0:
            alpha = rng.uniform(1 - self.hed_sigma, 1 + self.hed_sigma, 3)
            beta = rng.uniform(-self.hed_sigma, self.hed_sigma, 3)
            img = hed_jitter(img, alpha, beta)
        if rng.random() < blur_p:
            sigma = float(rng.uniform(*self.blur_sigma))
            k = self.blur_kernel_size or max(3, int(2 * math.ceil(2 * sigma) + 1))
            img = F.gaussian_blur(img, [k, k], [sigma, sigma])
        if rng.random() < solarize_p:
            img = F.solarize(img, 0.5)
        return img.clamp(0.0, 1.0).contiguous()

    def __call__(self, tile: np.ndarray, key: Sequence[int]) -> dict[str, list[Any]]:
        """Augment one tile.

        Parameters
        ----------
        tile : ndarray
            (H, W, 3) uint8 RGB.
        key : sequence of int
            Seed key, e.g. ``(seed, step, sample_index)``.
        """
        import torch

        rng = np.random.default_rng([int(k) for k in key])
        img = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float().div_(255.0)
        g1 = self._photometric(
            rng,
            self._crop(rng, img, self.global_crops_size, self.global_crops_scale),
            self.blur_p[0],
            0.0,
        )
        g2 = self._photometric(
            rng,
            self._crop(rng, img, self.global_crops_size, self.global_crops_scale),
            self.blur_p[1],
            self.solarize_p,
        )
        local = [
            self._photometric(
                rng,
                self._crop(rng, img, self.local_crops_size, self.local_crops_scale),
                self.blur_p[2],
                0.0,
            )
            for _ in range(self.local_crops_number)
        ]
        return {"global": [g1, g2], "local": local}
