"""Registry, tiny/expert/timm encoders, preprocessing, weight resolution and the default encoder."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gpfm_core.encoders import (
    EncoderMeta,
    create_encoder,
    default_encoder_name,
    experts,
    get_encoder_meta,
    list_encoders,
    preprocess,
    resolve_weights,
    save_encoder_safetensors,
    weights_env_var,
)
from gpfm_core.encoders.phikon_keys import phikon_to_timm, timm_to_phikon
from gpfm_core.errors import EncoderError

NAMES = [
    "gpfm",
    "gpfm-student",
    "uni",
    "phikon",
    "conch",
    "hed-texture",
    "tiny-vit",
    "tiny-expert",
]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("GPFM_WEIGHTS", "GPFM_UNI_WEIGHTS", "GPFM_PHIKON_WEIGHTS", "GPFM_STUDENT_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPFM_STUDENT_WEIGHTS", str(tmp_path / "no-student.safetensors"))
    return cache


def _tiles(n: int = 4, px: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def _feat(enc: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc(x)


# --- registry -------------------------------------------------------------------------------


def test_list_encoders_names_and_metas() -> None:
    metas = list_encoders()
    assert [m.name for m in metas] == NAMES
    assert all(isinstance(m, EncoderMeta) for m in metas)
    assert get_encoder_meta("uni").embed_dim == 1024 and get_encoder_meta("conch").input_px == 448


def test_unknown_name_lists_known_names_and_alternatives() -> None:
    with pytest.raises(EncoderError) as err:
        create_encoder("gpfmm")
    msg = str(err.value)
    assert (
        all(n in msg for n in NAMES) and "timm:<model>" in msg and "path" in msg and "\n" not in msg
    )
    with pytest.raises(EncoderError, match="known are"):
        get_encoder_meta("nope")


# --- tiny encoders --------------------------------------------------------------------------


def test_tiny_vit_shapes_determinism_and_hash() -> None:
    a, b = create_encoder("tiny-vit"), create_encoder("tiny-vit")
    x = preprocess(_tiles(), a.meta)
    fa, fb = _feat(a, x), _feat(b, x)
    assert fa.shape == (4, 64) and fa.dtype == torch.float32
    assert torch.equal(fa, fb) and a.weights_hash == "random-init-seed0"
    assert not a.training and isinstance(a.model, torch.nn.Module)
    with torch.no_grad():
        tokens = a.forward_tokens(x)
    assert torch.equal(tokens["cls"], fa)
    assert tokens["patch"].shape == (4, (112 // 14) ** 2, 64)
    assert (fa[0] - fa[1]).abs().max() > 1e-3  # features depend on the input
    other = create_encoder("tiny-vit", seed=1)
    assert other.weights_hash == "random-init-seed1" and not torch.equal(_feat(other, x), fa)


def test_tiny_expert_has_different_grid() -> None:
    enc = create_encoder("tiny-expert")
    with torch.no_grad():
        tokens = enc.forward_tokens(preprocess(_tiles(2), enc.meta))
    assert tokens["cls"].shape == (2, 48) and tokens["patch"].shape == (2, 49, 48)


def test_overrides_change_meta_and_architecture() -> None:
    enc = create_encoder("tiny-vit", tile_px=224, tile_mpp=0.5, embed_dim=32)
    assert (enc.meta.tile_px, enc.meta.tile_mpp, enc.meta.embed_dim) == (224, 0.5, 32)
    assert _feat(enc, preprocess(_tiles(1), enc.meta)).shape == (1, 32)
    with pytest.raises(EncoderError, match="cannot build"):
        create_encoder("tiny-vit", not_a_timm_arg=3)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(1, 3, 64, 64), "112x112"),
        (torch.zeros(1, 3, 112, 112, dtype=torch.uint8), "float"),
        (torch.zeros(3, 112, 112), r"\(B, 3, H, W\)"),
    ],
)
def test_bad_encoder_input_is_one_clear_error(x: torch.Tensor, match: str) -> None:
    with pytest.raises(EncoderError, match=match):
        create_encoder("tiny-vit")(x)


def test_device_errors() -> None:
    with pytest.raises(EncoderError, match="invalid device"):
        create_encoder("tiny-vit", device="gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            create_encoder("tiny-vit", device="cuda")


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_without_resize_is_exact_normalisation() -> None:
    meta = get_encoder_meta("tiny-vit")
    tiles = _tiles(3)
    x = preprocess(tiles, meta)
    ref = (tiles.astype(np.float32) / 255 - np.array(meta.mean)) / np.array(meta.std)
    assert x.shape == (3, 3, 112, 112) and x.dtype == torch.float32 and x.is_contiguous()
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)
    assert torch.equal(preprocess(torch.from_numpy(tiles), meta), x)
    assert torch.equal(preprocess(tiles[0], meta), x[:1])


def test_preprocess_resize_matches_pil_bicubic(he_png: Path) -> None:
    meta = get_encoder_meta("gpfm")  # 512 px tile -> 224 bicubic, as the authors' pipeline
    img = np.asarray(Image.open(he_png).convert("RGB"))[:512, :512]
    x = preprocess(img[None], meta)
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)).astype(np.float32)
    got = (x[0].permute(1, 2, 0).numpy() * np.array(meta.std) + np.array(meta.mean)) * 255
    diff = np.abs(got - ref)
    assert x.shape == (1, 3, 224, 224)
    assert diff.max() <= 1.01 and diff.mean() < 0.3  # within one grey level of PIL


def test_preprocess_reads_mean_std_from_meta() -> None:
    meta = get_encoder_meta("tiny-vit").replace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    tiles = _tiles(1)
    np.testing.assert_allclose(
        preprocess(tiles, meta).permute(0, 2, 3, 1).numpy(), tiles / 255.0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("tiles", "match"),
    [
        (np.zeros((1, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((1, 8, 8, 4), np.uint8), r"\(B, H, W, 3\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array or torch tensor"),
    ],
)
def test_preprocess_bad_input(tiles: object, match: str) -> None:
    with pytest.raises(EncoderError, match=match):
        preprocess(tiles, get_encoder_meta("tiny-vit"))


# --- experts ---------------------------------------------------------------------------------


def test_uni_and_phikon_full_size_skeletons() -> None:
    uni = create_encoder("uni", pretrained=False, device="meta")
    assert uni.meta.embed_dim == 1024 and uni.model.patch_embed.patch_size == (16, 16)
    assert uni.model.dynamic_img_size and len(uni.model.blocks) == 24
    assert uni.model.state_dict()["blocks.0.ls1.gamma"].shape == (1024,)
    phikon = create_encoder("phikon", pretrained=False, device="meta")
    assert phikon.meta.embed_dim == 768 and len(phikon.model.blocks) == 12
    assert phikon.model.norm.eps == 1e-12 and phikon.model.blocks[0].norm1.eps == 1e-12
    assert not hasattr(phikon.model.blocks[0].ls1, "gamma")  # iBOT ViT-B: no LayerScale


def test_uni_small_forward_and_dynamic_size() -> None:
    enc = create_encoder("uni", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    assert _feat(enc, torch.randn(1, 3, 224, 224)).shape == (1, 32)
    assert _feat(enc, torch.randn(1, 3, 256, 256)).shape == (1, 32)  # dynamic_img_size as published


def test_phikon_transformers_keys_round_trip(tmp_path: Path) -> None:
    small = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    src = create_encoder("phikon", pretrained=False, seed=7, **small)
    hf = timm_to_phikon(src.model.state_dict())
    assert hf["encoder.layer.1.attention.attention.query.weight"].shape == (32, 32)
    assert hf["embeddings.patch_embeddings.projection.weight"].shape == (32, 3, 16, 16)
    assert {"layernorm.weight", "embeddings.cls_token", "embeddings.position_embeddings"} <= set(hf)
    assert (
        "encoder.layer.0.intermediate.dense.weight" in hf
        and "encoder.layer.0.output.dense.bias" in hf
    )
    hf["pooler.dense.weight"] = torch.zeros(32, 32)  # ViTModel's pooler: unused by Phikon
    hf["pooler.dense.bias"] = torch.zeros(32)
    path = tmp_path / "phikon.safetensors"
    save_file(hf, str(path))
    enc = create_encoder("phikon", weights=path, **small)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(_feat(enc, x), _feat(src, x))
    partial = {k: v for k, v in hf.items() if not k.endswith("0.attention.attention.key.weight")}
    with pytest.raises(EncoderError, match="query/key/value"):
        phikon_to_timm(partial)


def test_conch_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experts, "conch_available", lambda: False)
    with pytest.raises(EncoderError, match=r"pip install git\+https://github.com/Mahmoodlab/CONCH"):
        create_encoder("conch")
    assert get_encoder_meta("conch").embed_dim == 512


# --- timm:<name> -----------------------------------------------------------------------------


def test_timm_any_random_and_local_weights(tmp_path: Path) -> None:
    spec = "timm:vit_small_patch16_224"
    kw = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    with pytest.raises(EncoderError, match="local file"):
        create_encoder(spec, **kw)
    rand = create_encoder(spec, pretrained=False, **kw)
    assert rand.meta.name == spec and rand.meta.embed_dim == 32 and rand.meta.input_px == 224
    assert rand.meta.mean == (0.5, 0.5, 0.5)  # from timm's pretrained_cfg, not hard-coded
    path = tmp_path / "w.safetensors"
    save_file(rand.model.state_dict(), str(path))
    loaded = create_encoder(spec, weights=path, **kw)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(_feat(loaded, x), _feat(rand, x))
    with pytest.raises(EncoderError, match="timm has no model"):
        create_encoder("timm:not_a_model", pretrained=False)


def test_timm_cnn_tokens() -> None:
    enc = create_encoder("timm:resnet10t", pretrained=False)
    with torch.no_grad():
        tokens = enc.forward_tokens(torch.randn(1, 3, 64, 64))
    assert tokens["cls"].shape == (1, enc.meta.embed_dim) and tokens["patch"].shape == (
        1,
        4,
        enc.meta.embed_dim,
    )
    assert enc.meta.patch_size is None


# --- weights resolution and the default encoder ----------------------------------------------


def _fake_hf_cache(cache: Path, repo: str, filename: str) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    target = folder / "snapshots" / rev / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    return target


def test_resolve_weights_local_env_offline_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_env: Path
) -> None:
    meta = get_encoder_meta("gpfm")
    local = tmp_path / "GPFM.pth"
    local.write_bytes(b"x")
    assert resolve_weights(meta, local) == local
    with pytest.raises(EncoderError, match="not an existing file"):
        resolve_weights(meta, tmp_path / "missing.pth")
    with pytest.raises(EncoderError, match="HF_HUB_OFFLINE is set") as err:
        resolve_weights(meta)
    assert "GPFM_WEIGHTS" in str(err.value) and "weights=PATH" in str(err.value)
    cached = _fake_hf_cache(_isolated_env, "majiabo/GPFM", "GPFM.pth")
    assert resolve_weights(meta) == cached
    monkeypatch.setenv("GPFM_WEIGHTS", str(local))
    assert resolve_weights(meta) == local
    monkeypatch.setenv("GPFM_WEIGHTS", str(tmp_path / "typo.pth"))
    with pytest.raises(EncoderError, match="GPFM_WEIGHTS="):
        resolve_weights(meta)
    assert (
        weights_env_var("uni") == "GPFM_UNI_WEIGHTS" and weights_env_var("gpfm") == "GPFM_WEIGHTS"
    )


def test_pretrained_gpfm_offline_without_weights_fails_clearly() -> None:
    with pytest.raises(EncoderError, match="HF_HUB_OFFLINE"):
        create_encoder("gpfm")


def test_default_encoder_fallback_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.warns(UserWarning, match="tiny-vit"):
        assert default_encoder_name() == "tiny-vit"
    with pytest.raises(EncoderError, match=r"gpfm-student weights .* are missing"):
        create_encoder("gpfm-student")
    student = save_encoder_safetensors(
        create_encoder("tiny-vit", seed=2), tmp_path / "student.safetensors"
    )
    monkeypatch.setenv("GPFM_STUDENT_WEIGHTS", str(student))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_encoder_name() == "gpfm-student"
    enc = create_encoder("default")
    assert enc.meta.name == "gpfm-student" and enc.meta.embed_dim == 64
    assert get_encoder_meta("gpfm-student").embed_dim == 64  # embedded meta wins once shipped
    gpfm = tmp_path / "GPFM.pth"
    gpfm.write_bytes(b"x")
    monkeypatch.setenv("GPFM_WEIGHTS", str(gpfm))
    assert default_encoder_name() == "gpfm"
