"""``gpfm encoders``: table, JSON, one encoder, errors; stays torch-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpfm_core.cli import main


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("GPFM_WEIGHTS", raising=False)
    monkeypatch.setenv("GPFM_STUDENT_WEIGHTS", str(tmp_path / "no-student.safetensors"))


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "dim", "input"] and set(lines[1]) <= {"-", " "}
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == [
        "gpfm",
        "gpfm-student",
        "uni",
        "phikon",
        "conch",
        "hed-texture",
        "tiny-vit",
        "tiny-expert",
    ]
    assert (
        "1024" in rows["gpfm"]
        and "512 px @ 0.25 µm/px" in rows["gpfm"]
        and "needs weights" in rows["gpfm"]
    )
    assert "CC BY-NC-ND 4.0" in rows["gpfm"]
    assert rows["tiny-vit"].rstrip().endswith("random-init")
    assert rows["hed-texture"].rstrip().endswith("no weights") and "96" in rows["hed-texture"]
    assert "224 px @ 0.5 µm/px" in rows["uni"]


def test_json_reports_available_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "GPFM.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv("GPFM_WEIGHTS", str(weights))
    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gpfm"]["weights"] == "available" and rows["gpfm"]["weights_env"] == "GPFM_WEIGHTS"
    assert (
        rows["uni"]["weights"] == "needs weights"
        and rows["uni"]["weights_env"] == "GPFM_UNI_WEIGHTS"
    )
    assert rows["tiny-vit"]["weights"] == "random-init" and rows["tiny-vit"]["weights_env"] is None
    assert (rows["gpfm"]["tile_px"], rows["gpfm"]["tile_mpp"], rows["gpfm"]["embed_dim"]) == (
        512,
        0.25,
        1024,
    )


def test_one_encoder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders", "phikon", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["name"] == "phikon" and row["embed_dim"] == 768 and row["hf_repo"] == "owkin/phikon"
    assert main(["encoders", "gpfm"]) == 0
    out = capsys.readouterr().out
    assert "vit_large_patch14_dinov2" in out and "majiabo/GPFM" in out


def test_unknown_encoder_exits_nonzero_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders", "gpfmm"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpfm encoders: error: unknown encoder 'gpfmm'") and "\n" not in err


def test_listing_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from gpfm_core.cli import main; rc = main(['encoders']);"
        "print('HEAVY', [m for m in ('torch', 'timm') if m in sys.modules]); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert "HEAVY []" in out.stdout and "tiny-vit" in out.stdout
