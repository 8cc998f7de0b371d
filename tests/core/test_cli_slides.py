"""``gpfm info`` / ``gpfm tiles`` / ``gpfm make-slide`` through the real CLI entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.cli import main
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid


def test_info_table_and_json(cmu_svs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(cmu_svs)]) == 0
    out = capsys.readouterr().out
    assert "2220 x 2967 px" in out and "0.499 x 0.499 µm/px (metadata)" in out
    assert "aperio" in out and "20x" in out and "tiles 240 x 240" in out
    assert main(["info", str(cmu_svs), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["level_dimensions"] == [[2220, 2967]] and d["mpp"] == [0.499, 0.499]
    assert d["properties"]["openslide.vendor"] == "aperio" and len(d["slide_id"]) == 16
    assert main(["info", str(cmu_svs), "--properties"]) == 0
    assert "aperio.AppMag = 20" in capsys.readouterr().out


def test_info_image_with_override(he_png: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(he_png)]) == 0
    assert "unknown (pass --slide-mpp)" in capsys.readouterr().out
    assert main(["info", str(he_png), "--slide-mpp", "0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mpp"] == [0.5, 0.5] and d["mpp_source"] == "override" and d["vendor"] == "image"


def test_tiles_summary_and_h5(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "coords.h5"
    argv = ["tiles", str(cmu_svs), "--mpp", "0.5", "--tile-px", "224", "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["grid_rows"] == 13 and summary["grid_cols"] == 9
    assert summary["tile_size_level0"] == 224 and 0.2 < summary["tissue_fraction"] < 0.9
    with open_slide(cmu_svs) as s:
        expected = make_tile_grid(s, mpp=0.5, tile_px=224, min_tissue=0.25)
    assert summary["n_tiles"] == len(expected)
    with h5py.File(out, "r") as f:
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (len(expected), 2)
        np.testing.assert_array_equal(f["coords"][:], expected.coords)
        np.testing.assert_array_equal(f["grid_rc"][:], expected.grid_rc)
        attrs = dict(f["coords"].attrs)
        assert attrs["tile_px"] == 224 and attrs["read_level"] == 0
        assert attrs["slide_id"] == expected.slide_id
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "coords.h5"]
    assert main([*argv[:2], "--overlap", "32", "--no-tissue"]) == 0
    text = capsys.readouterr().out
    assert "165 of 165 (15 x 11 grid)" in text and "stride 192" in text and "not used" in text


def test_tiles_blank_slide_warns_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    path = tmp_path / "white.png"
    Image.fromarray(np.full((600, 700, 3), 252, np.uint8)).save(path)
    assert main(["tiles", str(path), "--slide-mpp", "0.5", "--out", str(tmp_path / "e.h5")]) == 0
    captured = capsys.readouterr()
    assert "tiles      0 of 6" in captured.out
    assert (
        captured.err.count("\n") == 1 and "warning: " in captured.err and "0 tiles" in captured.err
    )
    with h5py.File(tmp_path / "e.h5", "r") as f:
        assert f["coords"].shape == (0, 2)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["info", "{tmp}/missing.svs"], "does not exist"),
        (["info", "{tmp}"], "is a folder"),
        (["info", "{tmp}/notes.txt"], "unsupported format '.txt'"),
        (["tiles", "{png}"], "--slide-mpp"),
        (["tiles", "{svs}", "--tile-px", "0"], "tile_px"),
        (["tiles", "{svs}", "--out", "{tmp}/no/such/dir/c.h5", "--no-tissue"], "does not exist"),
        (["info", "{svs}", "--slide-mpp", "-1"], "mpp="),
        (["make-slide", "{tmp}/x.png", "--width", "500", "--height", "500"], ".svs or .tif"),
    ],
)
def test_bad_input_exits_1_with_one_line(
    argv: list[str], match: str, tmp_path: Path, cmu_svs: Path, he_png: Path, capsys
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    args = [a.format(tmp=tmp_path, svs=cmu_svs, png=he_png) for a in argv]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gpfm {argv[0]}: error: ") and match in err


def test_make_slide(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.svs"
    argv = ["make-slide", str(out), "--width", "1500", "--height", "1100", "--mpp", "0.5"]
    argv += ["--tile", "256", "--source", str(data_dir / "he_patch_1000.png")]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with open_slide(out) as s:
        assert s.dimensions == (1500, 1100) and s.mpp == (0.5, 0.5) and s.level_count == 2


def test_console_script(cmu_svs: Path) -> None:
    exe = Path(sys.executable).with_name("gpfm")
    if not exe.exists():
        found = shutil.which("gpfm")
        assert found, "the gpfm console script is not installed: pip install -e ."
        exe = Path(found)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    ok = subprocess.run(
        [str(exe), "info", str(cmu_svs), "--json"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["slide_id"]
    bad = subprocess.run(
        [str(exe), "info", str(cmu_svs) + ".nope"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_output_into_a_closed_pipe_is_quiet(cmu_svs: Path) -> None:
    """`gpfm info slide | head -0`: exit 1, no traceback from the broken pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before gpfm writes a byte
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gpfm_core", "info", str(cmu_svs)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
