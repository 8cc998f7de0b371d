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


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        (["--mpp", "-1"], "mpp=-1.0 must be a positive number"),
        (["--tile-px", "0"], "tile_px=0 must be a positive integer"),
        (["--overlap", "300", "--tile-px", "224"], "overlap_px=300 must be an integer in [0, tile"),
        (["--overlap", "200"], "overlap_px=200 must be an integer in [0, tile_px=112)"),  # tiny-vit
        (["--min-tissue", "2"], "min_tissue=2.0 must lie in [0, 1]"),
        (["--batch-size", "0"], "batch_size must be >= 1, not 0"),
    ],
)
def test_gpfm_embed_settings_of_every_slide_are_checked_once_up_front(
    cmu_svs: Path,
    he_png: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: list[str],
    phrase: str,
) -> None:
    out = tmp_path / "emb"
    args = ["embed", str(cmu_svs), str(he_png), "--encoder", "tiny-vit", "--out", str(out)]
    assert main([*args, "--quiet", *option]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == f"gpfm embed: error: {err.split('error: ', 1)[1]}" and phrase in err
    assert len(err.splitlines()) == 1 and "FAILED" not in err and captured.out == ""
    assert not out.exists()  # nothing written, not even a report


def test_gpfm_embed_missing_manifest_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb"
    missing = tmp_path / "nosuch.csv"
    assert main(["embed", str(missing), "--encoder", "tiny-vit", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"gpfm embed: error: manifest {missing} not found; check the path"
    assert not out.exists()


@pytest.mark.parametrize("where", [[], ["--cluster", "local:1"]], ids=["inline", "cluster"])
def test_gpfm_embed_a_slide_without_tissue_is_one_line(
    tmp_path: Path, cmu_svs: Path, where: list[str]
) -> None:
    """A real process: warnings and log lines print as a user sees them (no pytest capture)."""
    import os
    import subprocess
    import sys

    from gpfm_core.synth import write_pyramid_tiff

    blank = write_pyramid_tiff(
        tmp_path / "blank.tif", np.full((1024, 1024, 3), 240, np.uint8), mpp=0.5
    )
    out = tmp_path / "emb"
    args = [str(blank), str(cmu_svs), "--encoder", "tiny-vit", "--mpp", "2", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "gpfm_core", "embed", *args, "--quiet", "--device", "cpu", *where],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # no warnings, no source lines, no log line (a cluster prints its dashboard link)
    assert [e for e in proc.stderr.splitlines() if not e.startswith("dask dashboard:")] == []
    lines = proc.stdout.splitlines()
    (empty,) = [line for line in lines if line.startswith(str(blank))]
    assert empty.endswith(": 0 tiles (no tissue); lower --min-tissue or check the slide")
    assert "slides: 2 embedded (1 with 0 tiles: no tissue)" in proc.stdout
    from gpfm_core.cohort.run import read_report

    (report,) = (out / "reports").glob("*.csv")
    rows = {r["slide_id"]: r for r in read_report(report)}
    assert (rows["blank"]["n_tiles"], rows["blank"]["note"]) == ("0", "no tissue")
    assert int(rows["cmu_small_region"]["n_tiles"]) > 0 and rows["cmu_small_region"]["note"] == ""
