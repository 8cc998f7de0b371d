"""Checkpoints are untrusted: a pickle that runs code on load must never be unpickled."""

from __future__ import annotations

import argparse
import ast
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpfm_core.encoders import create_encoder, load_checkpoint_file, read_checkpoint_spec
from gpfm_core.errors import EncoderError

ENCODERS_SRC = Path(__file__).resolve().parents[2] / "src" / "gpfm_core" / "encoders"


class Exploit:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle is executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _payload(marker: Path) -> dict:
    sd = create_encoder("tiny-vit", pretrained=False).model.state_dict()
    return {"model": dict(sd), "evil": Exploit(marker)}


@pytest.fixture(params=["torch-zip", "raw-pickle", "inside-timm-args-namespace"])
def crafted(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "GPFM.pth"
    if request.param == "torch-zip":
        torch.save(_payload(marker), path)
    elif request.param == "inside-timm-args-namespace":
        # timm's train.py stores argparse.Namespace, which the loader admits: what it holds must not
        payload = _payload(marker)
        payload["args"] = argparse.Namespace(model="vit", evil=payload.pop("evil"))
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(_payload(marker), fh)
    assert not marker.exists()
    return path, marker


def test_crafted_pickle_is_live(crafted: tuple[Path, Path]) -> None:
    """Control: a naive loader really would run the payload (so the other tests mean something)."""
    path, marker = crafted
    if path.read_bytes()[:2] == b"PK":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)  # deliberately unsafe control
    assert marker.exists()


@pytest.mark.parametrize(
    "load",
    [
        lambda p: load_checkpoint_file(p),
        lambda p: create_encoder("gpfm", weights=p, depth=1, embed_dim=32, num_heads=2),
        lambda p: create_encoder("tiny-vit", weights=p),
        lambda p: create_encoder(
            "timm:vit_small_patch14_dinov2",
            weights=p,
            img_size=112,
            embed_dim=64,
            depth=2,
            num_heads=2,
        ),
    ],
    ids=["load_checkpoint_file", "gpfm", "tiny-vit", "timm"],
)
def test_crafted_pickle_is_refused(crafted: tuple[Path, Path], load) -> None:
    path, marker = crafted
    with pytest.raises(EncoderError) as err:
        load(path)
    msg = str(err.value)
    assert "NOT unpickled" in msg and "safetensors" in msg and "\n" not in msg
    assert not marker.exists()


def test_crafted_pickle_with_sidecar_is_refused(crafted: tuple[Path, Path]) -> None:
    path, marker = crafted
    path.with_name(path.name + ".json").write_text(
        '{"arch": "vit_small_patch14_dinov2", "kwargs": {}}'
    )
    assert read_checkpoint_spec(path).arch == "vit_small_patch14_dinov2"
    with pytest.raises(EncoderError, match="NOT unpickled"):
        create_encoder(path)
    assert not marker.exists()


def test_safetensors_with_corrupt_metadata_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file(
        {"w": torch.zeros(1)},
        str(path),
        metadata={"gpfm.arch": "vit_small_patch14_dinov2", "gpfm.meta": "{not json"},
    )
    with pytest.raises(EncoderError, match="corrupt encoder metadata"):
        create_encoder(path)


def test_sources_never_unpickle_without_weights_only() -> None:
    calls = 0
    for src in sorted(ENCODERS_SRC.rglob("*.py")):
        text = src.read_text()
        assert not re.search(r"pickle\.loads?\(|Unpickler\(", text), f"{src} unpickles"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = (
                    isinstance(kw.get("weights_only"), ast.Constant)
                    and kw["weights_only"].value is True
                )
                assert ok, f"{src}:{node.lineno}: torch.load without weights_only=True"
                calls += 1
    assert calls >= 1  # the loader is found, so the check above ran
