"""``gpfm embed`` end to end on the real CMU sample slide with tiny-vit."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gpfm_core.cli import main
from gpfm_core.embed.layout import features_dir
from gpfm_core.encoders import create_encoder, preprocess
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid, read_tiles


def test_gpfm_embed_writes_a_trident_readable_file(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb"
    rc = main(
        [
            "embed",
            str(cmu_svs),
            "--encoder",
            "tiny-vit",
            "--mpp",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--precision",
            "fp32",  # compared with the fp32 forward below
            "--batch-size",
            "7",
            "--workers",
            "2",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    wh = create_encoder("tiny-vit").weights_hash
    path = features_dir(out, encoder="tiny-vit", weights_hash=wh, mpp=2.0, tile_px=112)
    path = path / "cmu_small_region.h5"
    assert f"-> {path}" in captured.out and "encoder: tiny-vit" in captured.out
    assert "tile" in captured.err  # the tqdm bar goes to stderr
    with h5py.File(path, "r") as f:  # a TRIDENT-style reader
        features, coords = f["features"][:], f["coords"][:]
    with open_slide(cmu_svs) as slide:
        grid = make_tile_grid(slide, mpp=2.0, tile_px=112, min_tissue=0.25)
        idx = np.array([1, len(grid) - 2])
        tiles = read_tiles(slide, grid, idx)
    assert features.shape == (len(grid), 64) and coords.dtype == np.int64
    np.testing.assert_array_equal(coords, grid.coords)
    enc = create_encoder("tiny-vit", device="cpu")
    with torch.inference_mode():
        direct = enc(preprocess(tiles, enc.meta)).numpy()
    # batched run vs a direct forward of a few tiles: float32 GEMMs of other shapes round
    # differently (machine-dependent); a wrong tile would differ by O(1)
    np.testing.assert_allclose(features[idx], direct, rtol=0, atol=1e-4 * np.abs(direct).max())

    mtime = path.stat().st_mtime_ns  # a second run reuses the file
    assert (
        main(
            [
                "embed",
                str(cmu_svs),
                "--encoder",
                "tiny-vit",
                "--mpp",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert "reused existing file" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime


def test_gpfm_embed_reports_a_bad_slide_and_continues(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide")
    out = tmp_path / "emb"
    rc = main(
        [
            "embed",
            str(bad),
            str(cmu_svs),
            "--encoder",
            "tiny-vit",
            "--mpp",
            "2",
            "--out",
            str(out),
            "--fp16",
            "--quiet",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "notes.svs" in err and "1 of 2 slide(s) failed" in err
    (path,) = out.rglob("*.h5")
    assert path.name == "cmu_small_region.h5"
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float16 and len(f["coords"]) > 0


def test_gpfm_embed_user_errors_are_one_line(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["embed", str(cmu_svs), "--encoder", "no-such-net", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpfm embed: error:") and "tiny-vit" in err and len(err.splitlines()) == 1
    if not torch.cuda.is_available():
        assert (
            main(
                [
                    "embed",
                    str(cmu_svs),
                    "--encoder",
                    "tiny-vit",
                    "--device",
                    "cuda",
                    "--out",
                    str(tmp_path),
                ]
            )
            == 1
        )
        err = capsys.readouterr().err.strip()
        assert "CUDA is not available" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
