"""The CPU int8 path: dynamic int8 quantisation, kept only when faithful to fp32.

Real torch models (tiny ViTs), real tiles of the CMU sample slide.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpfm_core.cli import main
from gpfm_core.embed import embed_slide, iter_embed_slide, load_embeddings
from gpfm_core.embed.device import (
    INT8_MIN_COSINE,
    INT8_MIN_TILES,
    PrecisionFallbackWarning,
    choose_cpu_precision,
    feature_fidelity,
    fidelity_sample,
    linear_flop_share,
)
from gpfm_core.encoders import create_encoder, preprocess
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid, read_tiles

MPP = 1.0  # tiny-vit's 112 px tiles: ~50 tissue tiles on the CMU sample


@pytest.fixture(scope="module")
def tiles(cmu_svs: Path) -> np.ndarray:
    with open_slide(cmu_svs) as slide:
        grid = make_tile_grid(slide, mpp=MPP, tile_px=112, min_tissue=0.25)
        return read_tiles(slide, grid, fidelity_sample(len(grid)))


def _outlier_vit() -> torch.nn.Module:
    """tiny-vit with one huge weight per linear layer.

    Dynamic int8 quantises each weight tensor with one scale (max |w| / 127): one outlier 100x
    the largest weight sends every other weight to 0 or +-1 step. The kind of model (outlier
    weights) where int8 is known to break.
    """
    enc = create_encoder("tiny-vit", device="cpu").eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[0, 0] = 100 * m.weight.abs().max()
    return enc


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_passes_on_a_tiny_vit(tiles: np.ndarray) -> None:
    enc = create_encoder("tiny-vit", device="cpu").eval()
    x = preprocess(tiles, enc.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)
        model, choice = choose_cpu_precision(enc, "int8", x)
    assert choice.precision == "int8" and choice.requested == "int8" and choice.n_tiles == len(x)
    assert model is not enc and model.meta == enc.meta
    quantised = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantised) == sum(isinstance(m, torch.nn.Linear) for m in enc.modules()) > 0
    with torch.inference_mode():
        ref, got = enc(x).numpy(), model(x).numpy()
    assert choice.min_cosine == pytest.approx(_cos(ref, got).min(), abs=1e-6)
    assert choice.min_cosine >= INT8_MIN_COSINE and choice.top10_overlap >= 0.9
    assert np.abs(ref - got).max() > 1e-4  # really quantised, not the fp32 model again
    again, _ = choose_cpu_precision(enc, "int8", x)
    assert again is model  # quantised once per encoder


def test_int8_that_is_not_faithful_falls_back_to_fp32(tiles: np.ndarray) -> None:
    enc = _outlier_vit()
    x = preprocess(tiles, enc.meta)
    with pytest.warns(PrecisionFallbackWarning, match="not faithful to fp32") as rec:
        model, choice = choose_cpu_precision(enc, "int8", x, label="slide.svs")
    assert model is enc and choice.precision == "fp32" and choice.min_cosine < INT8_MIN_COSINE
    msg = str(rec[0].message)
    assert msg.startswith("slide.svs: ") and "\n" not in msg and "min cosine" in msg


def test_slide_embedded_in_fp32_after_a_failed_check(cmu_svs: Path, tmp_path: Path) -> None:
    enc = _outlier_vit()
    with pytest.warns(PrecisionFallbackWarning):
        path = embed_slide(
            cmu_svs, encoder=enc, out_dir=tmp_path, mpp=MPP, device="cpu", precision="int8"
        )
    emb = load_embeddings(path)
    assert emb.attrs["compute_precision"] == "fp32" and emb.attrs["precision_requested"] == "int8"
    assert emb.attrs["int8_min_cosine"] < INT8_MIN_COSINE
    with open_slide(cmu_svs) as slide:
        grid = make_tile_grid(slide, mpp=MPP, tile_px=112, min_tissue=0.25)
        idx = np.array([0, len(grid) - 1])
        direct = enc(preprocess(read_tiles(slide, grid, idx), enc.meta)).detach().numpy()
    np.testing.assert_allclose(emb.features[idx], direct, atol=1e-5, rtol=0)


def test_auto_on_cpu_embeds_in_int8_when_faithful(cmu_svs: Path, tmp_path: Path) -> None:
    enc = create_encoder("tiny-vit", device="cpu")
    mpp = 0.5  # enough tiles (>= INT8_MIN_TILES) for int8 to repay its check
    gen = iter_embed_slide(cmu_svs, encoder=enc, out_dir=tmp_path, mpp=mpp, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                result = stop.value
                break
    assert result.precision == "int8"
    emb = load_embeddings(result.path)
    a = emb.attrs
    assert a["compute_precision"] == "int8" and a["precision_requested"] == "auto"
    assert a["int8_min_cosine"] >= INT8_MIN_COSINE and a["int8_check_tiles"] == 32
    with open_slide(cmu_svs) as slide:
        grid = make_tile_grid(slide, mpp=mpp, tile_px=112, min_tissue=0.25)
        assert len(grid) >= INT8_MIN_TILES
        with torch.inference_mode():
            direct = enc(preprocess(read_tiles(slide, grid, np.arange(len(grid))), enc.meta))
    cos = _cos(emb.features, direct.numpy())
    assert cos.min() >= INT8_MIN_COSINE and not np.allclose(emb.features, direct.numpy())
    # explicit fp32 never quantises
    fp32 = embed_slide(
        cmu_svs, encoder=enc, out_dir=tmp_path / "fp32", mpp=mpp, device="cpu", precision="fp32"
    )
    assert load_embeddings(fp32).attrs["compute_precision"] == "fp32"
    np.testing.assert_allclose(load_embeddings(fp32).features, direct.numpy(), atol=1e-5)


def test_auto_keeps_fp32_on_a_small_slide(cmu_svs: Path, tmp_path: Path) -> None:
    enc = create_encoder("tiny-vit", device="cpu")
    path = embed_slide(cmu_svs, encoder=enc, out_dir=tmp_path, mpp=MPP, device="cpu")
    emb = load_embeddings(path)
    assert len(emb) < INT8_MIN_TILES  # the check would cost more than int8 saves
    assert emb.attrs["compute_precision"] == "fp32" and emb.attrs["precision_requested"] == "auto"
    assert "int8_min_cosine" not in emb.attrs
    explicit = load_embeddings(
        embed_slide(
            cmu_svs, encoder=enc, out_dir=tmp_path / "i8", mpp=MPP, device="cpu", precision="int8"
        )
    )
    assert explicit.attrs["compute_precision"] == "int8"  # asked for: used, once checked


def test_auto_keeps_fp32_where_linear_layers_do_little(tiles: np.ndarray) -> None:
    enc = create_encoder("hed-texture", device="cpu").eval()  # filters, no linear layer
    x = preprocess(tiles[:4], enc.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)
        model, choice = choose_cpu_precision(enc, "auto", x)
    assert model is enc and choice.precision == "fp32" and choice.linear_share < 0.5
    assert "would not pay" in choice.reason


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny-vit", 0.6, 0.9), ("hed-texture", 0.0, 0.01)],
)
def test_linear_flop_share(tiles: np.ndarray, name: str, low: float, high: float) -> None:
    enc = create_encoder(name, device="cpu").eval()
    share = linear_flop_share(enc, preprocess(tiles[:1], enc.meta))
    # tiny-vit by hand, in MFLOP: linear 2 blocks x (3 + 1 + 8) x 64^2 x 65 tokens x 2 = 12.8;
    # patch convolution 3 x 14^2 x 64 x 64 patches x 2 = 4.8; attention products 2.2 (if the
    # counter sees them): a share of 0.65 to 0.73
    assert low <= share <= high


def _neighbours_swapped(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[:, :] = x[::-1]  # same vectors, other tiles: every tile's cosine to itself breaks
    return y


@pytest.mark.parametrize(
    ("case", "min_cos", "overlap"),
    [
        ("identical", (1.0, 1.0), (1.0, 1.0)),
        ("scaled by 3", (1.0, 1.0), (1.0, 1.0)),
        ("rows swapped", (-1.0, 0.9), (0.0, 0.6)),
        ("4 tiles", (1.0, 1.0), None),
    ],
)
def test_feature_fidelity_cases(case: str, min_cos: tuple, overlap: tuple | None) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    y = {
        "identical": x,
        "scaled by 3": 3 * x,
        "rows swapped": _neighbours_swapped(x),
        "4 tiles": x,
    }[case]
    if case == "4 tiles":
        x, y = x[:4], y[:4]
    c, o = feature_fidelity(x, y)
    assert min_cos[0] - 1e-9 <= c <= min_cos[1] + 1e-9
    if overlap is None:
        assert o is None
    else:
        assert o is not None and overlap[0] <= o <= overlap[1]


def test_cli_int8(cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 0.5 µm/px: enough tiles that the 32-tile fidelity sample spreads over the tissue (at
    # 2 µm/px the sample is nearly every tile, and a random tiny ViT's top-10 neighbours among
    # them are too close to call: the check then rightly falls back to fp32)
    args = ["embed", str(cmu_svs), "--encoder", "tiny-vit", "--mpp", "0.5", "--out", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)
        assert main([*args, "--device", "cpu", "--precision", "int8", "--quiet"]) == 0
    assert "[int8]" in capsys.readouterr().out
    (h5,) = tmp_path.rglob("cmu_small_region.h5")  # TRIDENT-style subfolders
    a = load_embeddings(h5).attrs
    assert a["compute_precision"] == "int8" and a["precision_requested"] == "int8"


def test_force_recomputes_an_int8_file_in_fp32(cmu_svs: Path, tmp_path: Path) -> None:
    """Precision is not in the reuse key: fp32 reuses an int8 file; --force recomputes it."""
    args = ["embed", str(cmu_svs), "--encoder", "tiny-vit", "--mpp", "0.5", "--out", str(tmp_path)]
    assert main([*args, "--device", "cpu", "--precision", "int8", "--quiet"]) == 0
    (h5,) = tmp_path.rglob("cmu_small_region.h5")
    assert load_embeddings(h5).attrs["compute_precision"] == "int8"
    assert main([*args, "--device", "cpu", "--precision", "fp32", "--quiet"]) == 0
    assert load_embeddings(h5).attrs["compute_precision"] == "int8"  # reused
    assert main([*args, "--device", "cpu", "--precision", "fp32", "--quiet", "--force"]) == 0
    (again,) = tmp_path.rglob("cmu_small_region.h5")
    assert again == h5 and load_embeddings(h5).attrs["compute_precision"] == "fp32"
