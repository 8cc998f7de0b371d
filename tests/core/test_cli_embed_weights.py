"""``gpfm embed --encoder timm:NAME --weights FILE``: any timm model with weights from a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from gpfm_core.cli import main
from gpfm_core.embed import load_embeddings
from gpfm_core.encoders import preprocess
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid, read_tiles

ARGS = ["--slide-mpp", "0.5", "--mpp", "2", "--tile-px", "160", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_encoder_with_weights_file_embeds_with_those_weights(
    he_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    torch.manual_seed(11)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    weights = tmp_path / f"test_vit{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(weights))
    else:
        torch.save({"state_dict": model.state_dict(), "epoch": 2}, weights)
    out = tmp_path / "emb"
    argv = ["embed", str(he_png), "--encoder", "timm:test_vit", "--weights", str(weights)]
    assert main([*argv, "--out", str(out), *ARGS]) == 0
    assert "encoder: timm:test_vit" in capsys.readouterr().out
    (h5,) = sorted(out.rglob("*.h5"))
    emb = load_embeddings(h5)
    with open_slide(he_png, mpp=0.5) as slide:
        grid = make_tile_grid(slide, mpp=2.0, tile_px=160, min_tissue=0.25)
        np.testing.assert_array_equal(emb.coords, grid.coords)
        idx = np.array([0, len(grid) - 1])
        tiles = read_tiles(slide, grid, idx)
    with torch.inference_mode():
        direct = model(preprocess(tiles, _meta_of(model))).numpy()
    assert emb.features.shape == (len(grid), 64)
    # batched run vs a 2-tile forward: float32 paths differ by rounding only
    scale = float(np.abs(direct).max())
    np.testing.assert_allclose(emb.features[idx], direct, rtol=0, atol=1e-4 * scale)
    # the test can fail: the random initialisation the flag replaced embeds differently
    torch.manual_seed(12)
    other = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    with torch.inference_mode():
        assert (
            np.abs(other(preprocess(tiles, _meta_of(other))).numpy() - direct).max() > 0.1 * scale
        )


def _meta_of(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    from gpfm_core.encoders.timm_any import meta_from_timm_model

    return meta_from_timm_model(model, name="timm:test_vit", arch="test_vit")


def test_timm_encoder_without_weights_names_the_flag(
    he_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["embed", str(he_png), "--encoder", "timm:test_vit", "--out", str(tmp_path / "o")]
    assert main([*argv, *ARGS]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights FILE" in err[0]
    # and the flag it names exists: a missing file is one line about that file
    assert main([*argv, "--weights", str(tmp_path / "nope.pth"), *ARGS]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pth" in err[0] and "not an existing file" in err[0]
