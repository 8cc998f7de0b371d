"""GPFM is built exactly as published and both published checkpoint layouts load bit-faithfully.

Random tensors are written in (1) the GitHub release layout (``{"teacher": {"backbone.*",
"dino_head.*"}}`` with DINOv2 BlockChunk keys) and (2) the bare timm layout of the HF copy; the
project's GPFM builder must reproduce an independent DINOv2 forward written from the paper's
equations, and a plain timm reference, to 1e-5. Reduced width/depth keeps CPU time low; the
code path (builder, adapter, strict loader) is the one the full model uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gpfm_core.encoders import create_encoder, file_sha256, get_encoder_meta
from gpfm_core.errors import EncoderError

SMALL = {"depth": 4, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("GPFM_WEIGHTS", raising=False)


def _reference_timm(**kw: int) -> torch.nn.Module:
    return timm.create_model(
        "vit_large_patch14_dinov2",
        pretrained=False,
        img_size=224,
        init_values=1e-5,
        num_classes=0,
        **kw,
    ).eval()


def _random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (LayerScale far from 1e-5, so each block matters and order is tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in _reference_timm(**SMALL).state_dict().items()}
    sd = {}
    for key, shape in shapes.items():
        if key.endswith(".gamma"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif "norm" in key and key.endswith(".weight"):
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key in ("cls_token", "pos_embed"):
            sd[key] = 0.5 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.05 * torch.randn(shape, generator=g)
    return sd


def dinov2_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, *, depth: int, heads: int
) -> torch.Tensor:
    """DINOv2 ViT (original code's math): CLS token after the final LayerNorm (eps 1e-6)."""
    patch = sd["patch_embed.proj.weight"].shape[-1]
    dim = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + sd["pos_embed"]
    b, n, _ = t.shape
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(-1)
        o = F.linear(
            (attn @ v).transpose(1, 2).reshape(b, n, dim),
            sd[p + "attn.proj.weight"],
            sd[p + "attn.proj.bias"],
        )
        t = t + sd[p + "ls1.gamma"] * o
        h = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        t = t + sd[p + "ls2.gamma"] * h
    return F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 0]


def github_layout(sd: dict[str, torch.Tensor], *, chunks: int, global_index: bool = True) -> dict:
    """The GPFM.pth release layout: teacher -> backbone.* in DINOv2 BlockChunks + heads + mask token."""
    depth = SMALL["depth"]
    size = depth // chunks
    backbone = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            idx, rest = key.split(".", 2)[1:]
            i = int(idx)
            inner = i if global_index else i % size
            key = f"blocks.{i // size}.{inner}.{rest}"
        backbone[f"backbone.{key}"] = value
    backbone["backbone.mask_token"] = torch.zeros(1, SMALL["embed_dim"])
    teacher = dict(backbone)
    teacher["dino_head.mlp.0.weight"] = torch.randn(32, SMALL["embed_dim"])
    teacher["dino_head.last_layer.weight_g"] = torch.ones(128, 1)
    return {"teacher": teacher}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return _random_state_dict()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(weights: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ref = dinov2_forward(weights, images, depth=SMALL["depth"], heads=SMALL["num_heads"])
        model = _reference_timm(**SMALL)
        model.load_state_dict(weights, strict=True)
        # the independent equations and timm agree: the reference itself is right
        assert (model(images) - ref).abs().max().item() <= 1e-5
    return ref


def _features(path: Path, images: torch.Tensor) -> torch.Tensor:
    enc = create_encoder("gpfm", weights=path, **SMALL)
    with torch.no_grad():
        return enc(images)


@pytest.mark.parametrize("chunks", [2, 4])
def test_github_release_layout_loads_exactly(
    tmp_path: Path, weights, images, expected, chunks: int
) -> None:
    path = tmp_path / "GPFM.pth"
    torch.save(github_layout(weights, chunks=chunks), path)
    got = _features(path, images)
    assert got.shape == (2, SMALL["embed_dim"])
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("with_student", [True, False], ids=["teacher+student", "teacher"])
def test_training_checkpoint_of_sslmetaarch_loads_the_teacher(
    tmp_path: Path, weights, images, expected, with_student: bool
) -> None:
    """DINOv2's training checkpoint (fvcore ``Checkpointer``): ``{"model": SSLMetaArch.state_dict()}``.

    No top-level ``teacher`` key: the teacher is ``teacher.backbone.*`` beside
    ``student.backbone.*``, the heads and the losses' centres. GPFM releases the teacher.
    """
    sd = {f"teacher.{k}": v for k, v in github_layout(weights, chunks=2)["teacher"].items()}
    if with_student:
        student = github_layout(_random_state_dict(seed=5), chunks=2)["teacher"]
        sd |= {f"student.{k}": v for k, v in student.items()}
        sd["student.ibot_head.mlp.0.weight"] = torch.randn(32, SMALL["embed_dim"])
    sd["dino_loss.center"] = torch.randn(1, 128)
    sd["ibot_patch_loss.center"] = torch.randn(1, 1, 128)
    path = tmp_path / "model_0012499.rank_0.pth"
    torch.save(
        {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "iteration": 12499}, path
    )
    enc = create_encoder("gpfm", weights=path, **SMALL)
    assert enc.weights_origin == "model > teacher.backbone"
    with torch.no_grad():
        assert (enc(images) - expected).abs().max().item() <= 1e-5


def test_hf_bare_timm_layout_loads_exactly(tmp_path: Path, weights, images, expected) -> None:
    path = tmp_path / "GPFM.pth"
    torch.save(weights, path)
    assert (_features(path, images) - expected).abs().max().item() <= 1e-5
    st = tmp_path / "GPFM.safetensors"
    save_file(weights, str(st))
    assert (_features(st, images) - expected).abs().max().item() <= 1e-5


def test_published_file_name_loads_as_gpfm(tmp_path: Path, weights, images, expected) -> None:
    path = tmp_path / "GPFM.pth"  # the published name: create_encoder(path) needs no encoder name
    torch.save(github_layout(weights, chunks=2), path)
    enc = create_encoder(path, **SMALL)
    assert enc.meta.name == "gpfm" and get_encoder_meta(str(path)).name == "gpfm"
    with torch.no_grad():
        assert (enc(images) - expected).abs().max().item() <= 1e-5


def test_weights_hash_is_file_sha256(tmp_path: Path, weights) -> None:
    path = tmp_path / "GPFM.pth"
    torch.save(weights, path)
    enc = create_encoder("gpfm", weights=path, **SMALL)
    assert enc.weights_hash == file_sha256(path)
    assert len(enc.weights_hash) == 16 and int(enc.weights_hash, 16) >= 0


def test_block_order_matters_so_the_test_can_fail(
    tmp_path: Path, weights, images, expected
) -> None:
    swapped = dict(weights)
    for rest in [k.split(".", 2)[2] for k in weights if k.startswith("blocks.0.")]:
        swapped[f"blocks.0.{rest}"], swapped[f"blocks.1.{rest}"] = (
            weights[f"blocks.1.{rest}"],
            weights[f"blocks.0.{rest}"],
        )
    path = tmp_path / "swapped.pth"
    torch.save(swapped, path)
    assert (_features(path, images) - expected).abs().max().item() > 1e-3


def test_chunk_local_indices_are_rejected(tmp_path: Path, weights) -> None:
    """DINOv2 chunks keep GLOBAL indices; a local-index file is corrupt and must not load silently."""
    path = tmp_path / "local_idx.pth"
    torch.save(github_layout(weights, chunks=2, global_index=False), path)
    with pytest.raises(EncoderError, match="chunks"):
        create_encoder("gpfm", weights=path, **SMALL)


def test_full_size_architecture_without_forward() -> None:
    enc = create_encoder("gpfm", pretrained=False, device="meta")
    d, depth, mlp, tokens = 1024, 24, 4096, 257
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
    expected = (3 * 14 * 14 * d + d) + d + tokens * d + depth * per_block + 2 * d
    with torch.device("meta"):
        timm_count = sum(p.numel() for p in _reference_timm().parameters())
    assert sum(p.numel() for p in enc.parameters()) == expected == timm_count == 303_227_904
    sd = enc.model.state_dict()
    assert sd["pos_embed"].shape == (1, 257, 1024)
    assert sd["cls_token"].shape == (1, 1, 1024)
    assert sd["patch_embed.proj.weight"].shape == (1024, 3, 14, 14)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3072, 1024)
    assert sd["blocks.23.ls2.gamma"].shape == (1024,)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4096, 1024)
    assert "blocks.24.norm1.weight" not in sd and "reg_token" not in sd and "mask_token" not in sd
    model = enc.model
    assert model.num_prefix_tokens == 1 and model.global_pool == "token"
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU)
    assert model.blocks[0].attn.num_heads == 16
    meta = enc.meta
    assert (meta.embed_dim, meta.input_px, meta.patch_size) == (1024, 224, 14)
    assert (meta.tile_px, meta.tile_mpp, meta.interpolation) == (512, 0.25, "bicubic")
    assert meta.field_of_view_um == 128.0
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
    assert "CC BY-NC-ND 4.0" in meta.license and meta.hf_repo == "majiabo/GPFM"


def test_random_init_layer_scale_is_published_value() -> None:
    enc = create_encoder("gpfm", pretrained=False, **SMALL)
    gamma = enc.model.blocks[0].ls1.gamma
    assert torch.allclose(gamma, torch.full_like(gamma, 1e-5))
    assert enc.weights_hash == "random-init-seed0"
