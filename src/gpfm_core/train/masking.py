"""iBOT block masks (DINOv2's ``MaskingGenerator`` and collate rule), seeded."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["block_mask", "sample_masks"]


def block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    num_masking: int,
    *,
    min_num_patches: int = 4,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """Mask about ``num_masking`` patches of a ``grid`` (rows, cols) with random blocks.

    Returns
    -------
    ndarray
        (rows, cols) bool, True = masked.
    """
    rows, cols = grid
    mask = np.zeros((rows, cols), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    tries = 0
    while count < num_masking and tries < 100:
        tries += 1
        max_mask = num_masking - count
        target = rng.uniform(min(min_num_patches, max_mask), max(min_num_patches, max_mask))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(target * aspect))
        w = round(math.sqrt(target / aspect))
        if not (0 < h <= rows and 0 < w <= cols):
            continue
        top = int(rng.integers(0, rows - h + 1))
        left = int(rng.integers(0, cols - w + 1))
        block = mask[top : top + h, left : left + w]
        new = int((~block).sum())
        if 0 < new <= max_mask:
            block[:] = True
            count += new
    return mask


def sample_masks(
    rng: np.random.Generator,
    n_crops: int,
    grid: tuple[int, int],
    *,
    probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> np.ndarray:
    """Masks for ``n_crops`` global crops: ``int(n * probability)`` get block masks whose ratios
    are spread over ``ratio_min_max`` (as DINOv2's collate), the rest none; order shuffled.

    Returns
    -------
    ndarray
        (n_crops, rows * cols) bool.
    """
    n_patches = grid[0] * grid[1]
    n_masked = int(n_crops * probability)
    probs = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    out = np.zeros((n_crops, n_patches), dtype=bool)
    for i in range(n_masked):
        ratio = rng.uniform(probs[i], probs[i + 1])
        out[i] = block_mask(rng, grid, int(n_patches * ratio)).reshape(-1)
    return out[rng.permutation(n_crops)]
