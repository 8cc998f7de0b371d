"""A labelled tile task from the sample images, and a linear-probe score for any encoder.

Task "source under stain variation": class 0 = tissue tiles of ``cmu_small_region.svs``
(skin), class 1 = tiles of ``he_patch_1000.png`` (carcinoma); every tile gets a seeded
random stain / colour perturbation (HED jitter, brightness, contrast, saturation) and a
random 90° rotation, so colour statistics alone do not separate the classes. Balanced:
``n_per_class`` tiles each (the PNG is cut with 50 % overlap to get enough).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["knn_accuracy", "linear_probe_accuracy", "stain_variation_task"]


def _perturb(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torchvision.transforms.v2.functional as F

    from gpfm_core.train.augment import hed_jitter

    img = torch.from_numpy(tile).permute(2, 0, 1).float() / 255.0
    img = hed_jitter(img, rng.uniform(0.7, 1.3, 3), rng.uniform(-0.1, 0.1, 3))
    img = F.adjust_brightness(img, rng.uniform(0.7, 1.3))
    img = F.adjust_contrast(img, rng.uniform(0.7, 1.3))
    img = F.adjust_saturation(img, rng.uniform(0.5, 1.5))
    img = torch.rot90(img, int(rng.integers(0, 4)), dims=(1, 2))
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def stain_variation_task(
    data_dir: str | Path,
    *,
    tile_px: int = 112,
    mpp: float = 0.5,
    n_per_class: int = 64,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Tiles and labels of the task.

    Returns
    -------
    tiles : ndarray
        (2 * n_per_class, tile_px, tile_px, 3) uint8.
    labels : ndarray
        (2 * n_per_class,) int64, 0 = CMU skin, 1 = H&E carcinoma PNG.
    """
    from PIL import Image

    from gpfm_core.train.data import build_dataset

    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    cmu = build_dataset(
        {
            "sources": [str(data_dir / "cmu_small_region.svs")],
            "image_folders": [],
            "use_sample_data": False,
            "mpp": mpp,
            "tile_px": tile_px,
            "min_tissue": 0.5,
            "assume_mpp": None,
            "cache_in_memory": False,
            "num_workers": 0,
        }
    )
    idx = rng.choice(len(cmu), size=min(n_per_class, len(cmu)), replace=False)
    a = cmu.tiles(np.sort(idx))
    cmu.close()
    with Image.open(data_dir / "he_patch_1000.png") as im:  # 0.25 µm/px assumed -> resample to mpp
        side = round(im.width * 0.25 / mpp)
        he = np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC))
    stride = tile_px // 2
    corners = [
        (y, x)
        for y in range(0, side - tile_px + 1, stride)
        for x in range(0, side - tile_px + 1, stride)
    ]
    pick = rng.choice(len(corners), size=min(n_per_class, len(corners)), replace=False)
    b = np.stack(
        [
            he[corners[i][0] : corners[i][0] + tile_px, corners[i][1] : corners[i][1] + tile_px]
            for i in np.sort(pick)
        ]
    )
    tiles = np.concatenate([a, b])
    tiles = np.stack([_perturb(t, rng) for t in tiles])
    labels = np.concatenate([np.zeros(len(a), np.int64), np.ones(len(b), np.int64)])
    return tiles, labels


def linear_probe_accuracy(
    features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> float:
    """Mean balanced accuracy of a standardised logistic regression, stratified k-fold CV.

    Parameters
    ----------
    features : (N, D) float
    labels : (N,) int
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(
        np.mean(cross_val_score(clf, features, labels, cv=cv, scoring="balanced_accuracy"))
    )


def knn_accuracy(
    features: np.ndarray, labels: np.ndarray, *, k: int = 20, folds: int = 5, seed: int = 0
) -> float:
    """Mean balanced accuracy of a cosine kNN classifier (distance-weighted votes, as DINO's
    kNN evaluation), stratified k-fold CV.

    Parameters
    ----------
    features : (N, D) float
    labels : (N,) int
    k : int
        Neighbours (at most the size of a training fold).
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    n_train = len(labels) - int(np.ceil(len(labels) / folds))
    clf = KNeighborsClassifier(
        n_neighbors=max(1, min(k, n_train)), metric="cosine", weights="distance"
    )
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(
        np.mean(cross_val_score(clf, features, labels, cv=cv, scoring="balanced_accuracy"))
    )


def encoder_features(
    embed: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray, batch: int = 64
) -> np.ndarray:
    """Apply ``embed`` ((B, H, W, 3) uint8 -> (B, D)) in batches; (N, D) float32."""
    return np.concatenate(
        [embed(tiles[i : i + batch]) for i in range(0, len(tiles), batch)]
    ).astype(np.float32)
