"""The training-free ``hed-texture`` encoder: shapes, determinism, stain robustness, as an expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpfm_core.encoders import create_encoder, preprocess
from gpfm_core.errors import EncoderError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def enc() -> torch.nn.Module:
    return create_encoder("hed-texture")


def _tiles(he_png: Path, n: int = 4, px: int = 224) -> np.ndarray:
    with Image.open(he_png) as im:
        rgb = np.asarray(im.convert("RGB"))
    return np.stack([rgb[i * 150 : i * 150 + px, 300 : 300 + px] for i in range(n)])


def _scale_stains(tiles: np.ndarray, factor: float) -> np.ndarray:
    """Multiply every stain's concentration (optical density) by ``factor``: paler/darker."""
    od = -np.log(np.clip(tiles / 255.0, 1 / 255, 1))
    return np.clip(255 * np.exp(-od * factor), 0, 255).round().astype(np.uint8)


def test_shapes_determinism_and_meta(enc: torch.nn.Module, he_png: Path) -> None:
    meta = enc.meta
    assert (meta.embed_dim, meta.input_px, meta.patch_size) == (96, 224, 16)
    assert meta.mean == (0.0, 0.0, 0.0) and meta.std == (1.0, 1.0, 1.0)
    assert not meta.weights_required and enc.weights_hash == "handcrafted"
    x = preprocess(_tiles(he_png), meta)
    with torch.no_grad():
        tokens = enc.forward_tokens(x)
        again = create_encoder("hed-texture").forward_tokens(x)
    assert tokens["cls"].shape == (4, 96) and tokens["patch"].shape == (4, 14 * 14, 96)
    assert torch.equal(tokens["cls"], enc(x)) and torch.equal(tokens["cls"], again["cls"])
    assert torch.isfinite(tokens["patch"]).all() and (tokens["cls"] >= 0).all()
    # any multiple of the 16 px cell works (as an expert it sees the student's crops)
    with torch.no_grad():
        small = enc.forward_tokens(torch.nn.functional.avg_pool2d(x, 2))
    assert small["patch"].shape == (4, 7 * 7, 96)


def test_robust_to_stain_strength_but_not_to_tissue(enc: torch.nn.Module, he_png: Path) -> None:
    tiles = _tiles(he_png, n=4)
    with torch.no_grad():
        base = enc(preprocess(tiles, enc.meta))
        pale = enc(preprocess(_scale_stains(tiles, 0.7), enc.meta))
    same = torch.nn.functional.cosine_similarity(base, pale).min()
    # another place of the same slide is further away than the same place, restained
    other = torch.nn.functional.cosine_similarity(base, base.roll(1, dims=0)).max()
    assert same > 0.99 and same > other
    # a flat white tile (no stain) is finite, not NaN
    with torch.no_grad():
        blank = enc(preprocess(np.full((1, 224, 224, 3), 255, np.uint8), enc.meta))
    assert torch.isfinite(blank).all()


def test_rejects_weights_and_options() -> None:
    with pytest.raises(EncoderError, match="no weights or options"):
        create_encoder("hed-texture", weights=Path("x.safetensors"))
    with pytest.raises(EncoderError, match="no weights or options"):
        create_encoder("hed-texture", depth=3)


def test_distils_into_a_student(he_png: Path, tmp_path: Path) -> None:
    """As a frozen expert in the training loop: targets flow and its losses go down."""
    from gpfm_core.train import load_config, train
    from gpfm_core.train.logging_csv import read_metrics

    cfg = load_config(
        "tiny_cpu",
        overrides=[
            f"data.sources=['{he_png}']",
            "data.assume_mpp=0.5",
            "experts=[{name: hed-texture, weights: {cls: 1.0, patch: 0.25}}]",
            "expert_loss.standardize=true",
            "dino.loss_weight=0",
            "ibot.loss_weight=0",
            "optim.total_steps=25",
            "train.checkpoint_every=1000",
        ],
    )
    train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    for name in ("expert_hed_texture_cls", "expert_hed_texture_patch"):
        v = [float(r[name]) for r in rows]
        assert sum(v[-5:]) / 5 < 0.9 * sum(v[:5]) / 5, (name, v[:5], v[-5:])
