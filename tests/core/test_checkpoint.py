"""Checkpoint reading, unwrapping, strict loading and the self-describing safetensors format."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpfm_core.encoders import (
    EncoderMeta,
    create_encoder,
    file_sha256,
    get_encoder_meta,
    load_checkpoint_file,
    load_state_dict_strict,
    read_checkpoint_spec,
    save_encoder_safetensors,
    unwrap_state_dict,
)
from gpfm_core.errors import EncoderError


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return create_encoder("tiny-vit", pretrained=False, seed=3)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def _feat(enc: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"student": {f"_orig_mod.{k}": v for k, v in sd.items()}, "step": 10},
        lambda sd: {
            "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.w": torch.ones(2)}
        },
        lambda sd: {f"model.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {**sd, "head.weight": torch.ones(5, 64), "head.bias": torch.ones(5)}},
        lambda sd: {"model": {"name": "vit", "depth": 2}, "state_dict": sd},
    ],
    ids=[
        "model",
        "state_dict+module",
        "student+orig_mod",
        "teacher+backbone+head",
        "model-prefix",
        "classifier",
        "config-under-model",
    ],
)
def test_wrappers_and_prefixes_unwrap(tmp_path: Path, tiny, x, wrap) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(tiny.model.state_dict()), path)
    sd = load_checkpoint_file(path)
    assert (
        set(tiny.model.state_dict())
        <= set(sd)
        <= set(tiny.model.state_dict()) | {"head.weight", "head.bias"}
    )
    enc = create_encoder("tiny-vit", weights=path)
    assert torch.equal(_feat(enc, x), _feat(tiny, x))
    assert enc.weights_hash == file_sha256(path) != "random-init-seed0"


def test_teacher_preferred_over_student() -> None:
    t, s = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    assert torch.equal(unwrap_state_dict({"student": s, "teacher": t})["w"], t["w"])


def test_no_tensors_is_an_error() -> None:
    with pytest.raises(EncoderError, match="no tensors"):
        unwrap_state_dict({"epoch": 1, "config": {"lr": 0.1}})


def test_strict_load_names_missing_unexpected_and_shapes(tiny) -> None:
    sd = dict(tiny.model.state_dict())
    sd.pop("norm.weight")
    sd["extra.thing"] = torch.zeros(1)
    sd["pos_embed"] = torch.zeros(1, 5, 64)
    model = create_encoder("tiny-vit", pretrained=False).model
    with pytest.raises(EncoderError) as err:
        load_state_dict_strict(model, sd, source="x.pth")
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 1 key(s): norm.weight" in msg
    assert "unexpected 1 key(s): extra.thing" in msg
    assert "pos_embed (1, 5, 64) vs model (1, 65, 64)" in msg


def test_key_lists_are_truncated(tiny) -> None:
    model = create_encoder("tiny-vit", pretrained=False).model
    with pytest.raises(EncoderError, match=r"missing \d+ key\(s\): .*\(\+\d+ more\)"):
        load_state_dict_strict(model, {"a": torch.zeros(1)}, source="x")


def test_wrong_architecture_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file(create_encoder("tiny-expert", pretrained=False).model.state_dict(), str(path))
    with pytest.raises(EncoderError, match="do not fit this architecture"):
        create_encoder("tiny-vit", weights=path)


def test_half_precision_checkpoint_loads_as_float32(tmp_path: Path, tiny, x) -> None:
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in tiny.model.state_dict().items()}, str(path))
    enc = create_encoder("tiny-vit", weights=path)
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    assert (_feat(enc, x) - _feat(tiny, x)).abs().max().item() < 5e-2


def test_save_encoder_safetensors_round_trip(tmp_path: Path, tiny, x) -> None:
    enc = create_encoder("tiny-vit", pretrained=False, seed=5, tile_mpp=0.5)
    umask = os.umask(0o022)
    try:
        path = save_encoder_safetensors(enc, tmp_path / "sub" / "student.safetensors")
    finally:
        os.umask(umask)
    assert path.is_file() and not list(path.parent.glob("*.tmp-*"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not safetensors' owner-only 0600
    spec = read_checkpoint_spec(path)
    assert spec.arch == "vit_small_patch14_dinov2" and spec.kwargs["embed_dim"] == 64
    assert spec.meta == enc.meta and spec.meta.tile_mpp == 0.5
    loaded = create_encoder(path)  # no extra arguments
    assert loaded.meta == enc.meta
    assert loaded.weights_hash == file_sha256(path)
    assert torch.equal(_feat(loaded, x), _feat(enc, x))
    assert not torch.equal(_feat(loaded, x), _feat(tiny, x))
    assert get_encoder_meta(str(path)) == enc.meta


def test_save_state_dict_needs_arch_and_json_kwargs(tmp_path: Path, tiny) -> None:
    sd = tiny.model.state_dict()
    with pytest.raises(EncoderError, match="arch="):
        save_encoder_safetensors(sd, tmp_path / "a.safetensors")
    with pytest.raises(EncoderError, match="JSON"):
        save_encoder_safetensors(
            sd, tmp_path / "a.safetensors", arch="vit_small_patch14_dinov2", kwargs={"f": object()}
        )
    with pytest.raises(EncoderError, match=r"\.safetensors"):
        save_encoder_safetensors(sd, tmp_path / "a.pth", arch="vit_small_patch14_dinov2")


def test_bare_state_dict_without_meta_derives_meta_from_timm(tmp_path: Path, tiny, x) -> None:
    path = save_encoder_safetensors(
        tiny.model.state_dict(),
        tmp_path / "bare.safetensors",
        arch=tiny.arch,
        kwargs=tiny.model_kwargs,
    )
    enc = create_encoder(path)
    assert enc.meta.name == "bare" and enc.meta.family == "local"
    assert (enc.meta.embed_dim, enc.meta.input_px, enc.meta.patch_size) == (64, 112, 14)
    assert torch.equal(_feat(enc, x), _feat(tiny, x))


def test_pth_with_json_sidecar(tmp_path: Path, tiny, x) -> None:
    path = tmp_path / "mine.pth"
    torch.save({"model": tiny.model.state_dict()}, path)
    side = {
        "arch": tiny.arch,
        "kwargs": tiny.model_kwargs,
        "meta": tiny.meta.replace(name="mine").to_dict(),
    }
    (tmp_path / "mine.pth.json").write_text(json.dumps(side))
    enc = create_encoder(str(path))
    assert enc.meta.name == "mine"
    assert torch.equal(_feat(enc, x), _feat(tiny, x))


def test_checkpoint_without_description_says_what_to_do(tmp_path: Path, tiny) -> None:
    path = tmp_path / "anon.pth"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(EncoderError, match=r"create_encoder\('gpfm', weights=PATH\)"):
        create_encoder(path)


@pytest.mark.parametrize(
    "case", ["missing", "empty", "folder", "garbage.pth", "garbage.safetensors"]
)
def test_bad_files_raise_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / (case if "." in case else f"{case}.pth")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    elif case.startswith("garbage"):
        path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(EncoderError) as err:
        create_encoder("tiny-vit", weights=path)
    assert "\n" not in str(err.value) and str(path.name) in str(err.value)
    if case.startswith("garbage"):
        with pytest.raises(EncoderError):
            load_checkpoint_file(path)


def test_meta_json_round_trip_and_validation() -> None:
    meta = get_encoder_meta("gpfm")
    assert EncoderMeta.from_json(meta.to_json()) == meta
    assert EncoderMeta.from_dict({**meta.to_dict(), "future_field": 1}) == meta
    with pytest.raises(EncoderError, match="lacks"):
        EncoderMeta.from_dict({"name": "x"})
    with pytest.raises(EncoderError, match="interpolation"):
        meta.replace(interpolation="lanczos9")
    with pytest.raises(EncoderError, match="std"):
        meta.replace(std=(0.2, 0.0, 0.2))
    with pytest.raises(EncoderError, match="tile_mpp"):
        meta.replace(tile_mpp=0)
    with pytest.raises(EncoderError, match="unknown EncoderMeta field"):
        meta.replace(colour="blue")
    with pytest.raises(AttributeError):
        meta.embed_dim = 3  # type: ignore[misc]
