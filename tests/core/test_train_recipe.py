"""GPFM's recipe, point by point, on real tiny torch models (docs/recipe_card.md gives sources).

1. ``student.init_weights`` is loaded strictly before the teacher copy (GPFM's layout and timm's).
2. Drop-path is uniform (0.4 in every block).
3. KoLeo is summed over the two global crops.
4. Gradients are clipped per module (backbone, DINO head); the expert heads are never clipped.
5. CONCH's target is its projected, L2-normalised embedding of the student's 224 px crop.
6. Augmentations: grey 0.2, bicubic crops, the blur as GPFM ran it, rotations/HED opt-in.
7. Heads and optimiser: trainable DINO gain, bias-free expert heads with gain 1 and a frozen
   last layer, weight decay on the tokens, the KL option at T = 1 with T².
8. Schedule: 500,000 steps, 50,000 warm-up, batch 96, EMA centring; the release at 87,500.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_gpfm_fidelity import SMALL, _random_state_dict, dinov2_forward, github_layout
from test_train_loop import tiny
from torch import nn

from gpfm_core.cli import main
from gpfm_core.encoders._conch import ConchEncoder, conch_shaped_model
from gpfm_core.encoders._meta import IMAGENET_MEAN, IMAGENET_STD
from gpfm_core.encoders.experts import CONCH_META
from gpfm_core.errors import ConfigError, EncoderError
from gpfm_core.train import load_config, train
from gpfm_core.train.augment import MultiCropAugment
from gpfm_core.train.logging_csv import read_metrics
from gpfm_core.train.loop import batches, build, clip_gradients, train_step
from gpfm_core.train.losses import ExpertCLSLoss, KoLeoLoss
from gpfm_core.train.meta_arch import UnifiedDistillation
from gpfm_core.train.models import Expert, StudentBackbone, load_expert, normalise
from gpfm_core.train.optim import param_groups, scaled_lr
from gpfm_core.train.schedules import Schedules

torch.set_num_threads(1)


def tiny_model(*items: str, experts: list[Expert] | None = None) -> UnifiedDistillation:
    """tiny_cpu's meta-architecture (no data needed), seeded."""
    torch.manual_seed(0)
    cfg = load_config("tiny_cpu", overrides=["experts=[]", *items])
    return UnifiedDistillation(cfg, experts or [])


def tiny_batch(b: int = 4, *, size: int = 56, n_local: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(2 * b, (size // 14) ** 2, dtype=torch.bool)
    masks[::2, :5] = True
    return {
        "global": torch.rand(2 * b, 3, size, size, generator=g),
        "local": torch.rand(n_local * b, 3, 28, 28, generator=g),
        "masks": masks,
    }


# --- 1. start weights --------------------------------------------------------------------

STAGE1 = [
    "student.arch=vit_large_patch14_dinov2",
    f"student.kwargs={{img_size: 224, depth: {SMALL['depth']}, embed_dim: {SMALL['embed_dim']}, "
    f"num_heads: {SMALL['num_heads']}, init_values: 1.0e-5}}",
]


@pytest.mark.parametrize("layout", ["gpfm", "timm"])
def test_init_weights_load_strictly_into_student_and_teacher(tmp_path: Path, layout: str) -> None:
    """GPFM's ``{"teacher": {"backbone.blocks.<chunk>.<i>.*", "backbone.mask_token",
    "dino_head.*"}}`` and a bare timm safetensors give the same student: its forward equals an
    independent DINOv2 forward of the file's weights, and the EMA teacher starts as its copy."""
    weights = _random_state_dict()
    mask = torch.randn(1, SMALL["embed_dim"])
    if layout == "gpfm":
        raw = github_layout(weights, chunks=2)
        raw["teacher"]["backbone.mask_token"] = mask
        path = tmp_path / "teacher_checkpoint.pth"
        torch.save(raw, path)
    else:
        path = tmp_path / "stage1.safetensors"
        save_file({**weights, "mask_token": mask}, str(path))
    model = tiny_model(*STAGE1, f"student.init_weights={path}").eval()
    student = model.student["backbone"]
    assert all(torch.equal(student.model.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(student.mask_token.detach(), mask)
    teacher = model.teacher["backbone"].state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in student.state_dict().items())
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dinov2_forward(weights, images, depth=SMALL["depth"], heads=SMALL["num_heads"])
        assert (student(images)["cls"] - ref).abs().max().item() <= 1e-5


def test_init_weights_that_do_not_fit_or_do_not_exist_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _random_state_dict()
    del weights["blocks.3.mlp.fc2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(weights, str(path))
    with pytest.raises(ConfigError, match=r"student.init_weights.*missing 1 key") as info:
        tiny_model(*STAGE1, f"student.init_weights={path}")
    assert "\n" not in str(info.value)
    # before: `--set student.init_weights=/nonexistent` trained from random weights, silently
    for init, says in (("/nonexistent/stage1.pth", "not found"), ("required", "init_weights=PATH")):
        argv = ["train", "--config", "tiny_cpu", "--out", str(tmp_path / "run")]
        assert main([*argv, "--set", f"student.init_weights={init}"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "student.init_weights" in err[0] and says in err[0], err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert load_config("gpfm")["student"]["init_weights"] == "required"


# --- 2. drop-path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uniform", "rates"), [(True, [0.4, 0.4, 0.4, 0.4]), (False, [0.0, 0.4 / 3, 0.8 / 3, 0.4])]
)
def test_drop_path_is_the_rate_in_every_block(uniform: bool, rates: list[float]) -> None:
    bb = StudentBackbone(
        "vit_small_patch14_dinov2",
        {"img_size": 28, "embed_dim": 32, "depth": 4, "num_heads": 2},
        drop_path_rate=0.4,
        drop_path_uniform=uniform,
    ).train()
    for block, rate in zip(bb.model.blocks, rates, strict=True):
        for dp in (block.drop_path1, block.drop_path2):
            assert getattr(dp, "drop_prob", 0.0) == pytest.approx(rate)
    # what the first block's residual branch does to 4000 samples
    torch.manual_seed(0)
    kept = bb.model.blocks[0].drop_path1(torch.ones(4000, 1, 1)).flatten() != 0
    assert abs((~kept).float().mean().item() - rates[0]) < 0.03
    cfg = load_config()
    assert cfg["student"]["drop_path_uniform"] is True and cfg["student"]["drop_path_rate"] == 0.4


# --- 3. KoLeo ----------------------------------------------------------------------------


@pytest.mark.parametrize(("reduction", "factor"), [("sum", 1.0), ("mean", 0.5)])
def test_koleo_is_summed_over_the_two_global_crops(reduction: str, factor: float) -> None:
    model = tiny_model(
        "dino.loss_weight=0", "ibot.loss_weight=0", f"dino.koleo_reduction={reduction}"
    ).eval()
    batch = tiny_batch()
    with torch.no_grad():
        losses = model(batch, teacher_temp=0.04)
        cls = model.backbone(normalise(batch["global"], model.mean, model.std))["cls"]
    koleo = KoLeoLoss()
    per_crop = [koleo(c) for c in cls.chunk(2)]  # never between the two crops of one tile
    assert losses["koleo"].item() == pytest.approx(factor * sum(per_crop).item(), rel=1e-5)
    assert losses["total"].item() == pytest.approx(0.1 * losses["koleo"].item(), rel=1e-6)
    assert load_config()["dino"]["koleo_reduction"] == "sum"


# --- 4. gradient clipping ----------------------------------------------------------------


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _norm(grads: dict[str, torch.Tensor], prefix: str) -> float:
    return torch.cat([g.flatten() for n, g in grads.items() if n.startswith(prefix)]).norm().item()


@pytest.mark.parametrize("mode", ["per_module", "joint"])
def test_gradients_are_clipped_per_module_and_expert_heads_never(mode: str) -> None:
    """GPFM clips ``model.student``'s backbone and DINO head to 3.0 each; its distillation
    heads live elsewhere and are never clipped. ``joint`` (the option) scales everything by one
    factor, so a large expert-head gradient shrinks the backbone's step."""
    spec = load_config("tiny_cpu")["experts"][0]
    model = tiny_model(experts=[load_expert(spec, device=torch.device("cpu"))])
    model(tiny_batch(), teacher_temp=0.04)["total"].backward()
    student = model.student
    before = _grads(student)
    norms = {k: _norm(before, k) for k in ("backbone", "dino_head", "expert_heads")}
    clip = 0.5 * min(norms.values())  # every module is over the limit
    returned = clip_gradients(student, clip, mode=mode)
    after = _grads(student)
    if mode == "per_module":
        assert {k: float(v) for k, v in returned.items()} == pytest.approx(norms, rel=1e-5)
        assert _norm(after, "backbone") == pytest.approx(clip, rel=1e-4)
        assert _norm(after, "dino_head") == pytest.approx(clip, rel=1e-4)
        assert all(torch.equal(after[n], before[n]) for n in before if n.startswith("expert"))
    else:
        total = float(np.sqrt(sum(v**2 for v in norms.values())))
        assert float(returned["all"]) == pytest.approx(total, rel=1e-5)
        for n in before:
            assert torch.allclose(after[n], before[n] * clip / total, rtol=1e-4, atol=1e-12), n
    assert load_config()["optim"]["clip_grad_mode"] == "per_module"


# --- 5. CONCH's target -------------------------------------------------------------------


def test_conch_target_is_the_projected_normalised_embedding_of_the_224px_crop() -> None:
    torch.manual_seed(0)
    net = conch_shaped_model(
        width=32, depth=1, heads=2, dim=24, pool_heads=2, caption_queries=0
    ).eval()
    enc = ConchEncoder(net, replace(CONCH_META, embed_dim=24), weights_hash="random-init-seed0")
    seen: list[tuple[int, ...]] = []
    net.visual.trunk.patch_embed.register_forward_pre_hook(
        lambda _m, args: seen.append(tuple(args[0].shape[-2:]))
    )
    crops = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    gpfm = Expert("conch", enc, 1.0, 0.0, input="crop", target="contrastive")
    option = Expert("conch", enc, 1.0, 0.0, input="native", target="embedding")
    kw = {"want_patch": False, "crop_mean": IMAGENET_MEAN, "crop_std": IMAGENET_STD}
    with torch.no_grad():
        got = gpfm.targets(crops, (16, 16), **kw)["cls"]
        assert seen == [(224, 224)]  # 196 tokens
        want = net.encode_image(normalise(crops, IMAGENET_MEAN, IMAGENET_STD))
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert not torch.allclose(got, net.encode_image(normalise(crops, *_clip())), atol=1e-3)
        # the option: CONCH's own preprocessing (448 px, CLIP mean/std), no projection
        pooled = option.targets(crops, (16, 16), **kw)["cls"]
        assert seen[-1] == (448, 448)  # 784 tokens
        big = F.interpolate(crops, size=(448, 448), mode="bicubic", antialias=True)
        ref = net.encode_image(normalise(big.clamp(0, 1), *_clip()), False, False)
        assert torch.allclose(pooled, ref, atol=1e-5)
    assert gpfm.embed_dim == option.embed_dim == 24
    # through the meta-architecture: the head predicts the 24-d target, the loss is finite
    model = tiny_model(experts=[gpfm])
    losses = model(tiny_batch(size=112), teacher_temp=0.04)  # a multiple of 14 and of 16
    assert model.student["expert_heads"]["conch"].last_layer.out_features == 24
    assert torch.isfinite(losses["expert_conch_cls"]) and "expert_conch_patch" not in losses
    conch = next(e for e in load_config()["experts"] if e["name"] == "conch")
    assert (conch["input"], conch["target"]) == ("crop", "contrastive")


def _clip() -> tuple[tuple[float, ...], tuple[float, ...]]:
    return CONCH_META.mean, CONCH_META.std


def test_contrastive_target_needs_a_projection() -> None:
    spec = {**load_config("tiny_cpu")["experts"][0], "target": "contrastive"}
    with pytest.raises(EncoderError, match="no contrastive projection") as info:
        load_expert(spec, device=torch.device("cpu"))
    assert "\n" not in str(info.value)


# --- 6. augmentations --------------------------------------------------------------------

TILE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
QUIET = {  # everything off but what a test switches on; crops are the whole 32 px tile
    "global_crops_size": 32,
    "global_crops_scale": (1.0, 1.0),
    "local_crops_number": 2,
    "local_crops_size": 32,
    "local_crops_scale": (1.0, 1.0),
    "flip_p": 0.0,
    "color_jitter_p": 0.0,
    "grayscale_p": 0.0,
    "blur_p": (0.0, 0.0, 0.0),
    "solarize_p": 0.0,
}


def _crops(aug: MultiCropAugment, n: int) -> list[list[torch.Tensor]]:
    """``[first globals, second globals, locals]`` over ``n`` samples."""
    out: list[list[torch.Tensor]] = [[], [], []]
    for i in range(n):
        c = aug(TILE, (0, 0, i))
        out[0].append(c["global"][0])
        out[1].append(c["global"][1])
        out[2].extend(c["local"])
    return out


def test_blur_is_applied_as_gpfm_ran_it() -> None:
    """GPFM's ``GaussianBlur(p)`` is a ``RandomApply`` given ``1 - p``: configured 1.0 / 0.1 /
    0.5, it blurs 0 / 0.9 / 0.5 of the crops. ``blur_p`` defaults to what was run."""
    from torchvision import transforms

    torch.manual_seed(0)
    img = torch.from_numpy(TILE).permute(2, 0, 1).float() / 255
    # sigma >= 1 so every blur shows (at sigma 0.1 a 9-tap blur leaves float32 pixels as they are)
    blur = transforms.GaussianBlur(kernel_size=9, sigma=(1.0, 2.0))
    ran = []
    for configured in (1.0, 0.1, 0.5):
        wrapper = transforms.RandomApply([blur], p=1 - configured)
        ran.append(np.mean([not torch.equal(wrapper(img), img) for _ in range(400)]))
    assert ran[0] == 0.0 and abs(ran[1] - 0.9) < 0.05 and abs(ran[2] - 0.5) < 0.08
    assert MultiCropAugment().blur_p == (0.0, 0.9, 0.5) == tuple(load_config()["crops"]["blur_p"])
    # the augmentation blurs at those rates (a crop of the whole tile is the tile, unless blurred)
    aug = MultiCropAugment(**{**QUIET, "blur_p": (0.0, 0.9, 0.5), "blur_sigma": (1.0, 2.0)})
    ref = torch.from_numpy(TILE).permute(2, 0, 1).float() / 255
    rates = [
        np.mean([not torch.allclose(c, ref, atol=1e-6) for c in crops])
        for crops in _crops(aug, 200)
    ]
    assert rates[0] == 0.0 and abs(rates[1] - 0.9) < 0.07 and abs(rates[2] - 0.5) < 0.08


def test_grayscale_bicubic_and_opt_in_rotations_and_stain_jitter() -> None:
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    ref = torch.from_numpy(TILE).permute(2, 0, 1).float() / 255
    # defaults: no rotation, no stain jitter -> with the rest off, every crop is the tile
    assert all(
        torch.allclose(c, ref, atol=1e-6)
        for crops in _crops(MultiCropAugment(**QUIET), 20)
        for c in crops
    )
    grey = MultiCropAugment(**{**QUIET, "grayscale_p": 0.2})
    flat = [c for crops in _crops(grey, 200) for c in crops]
    is_grey = [bool((c[0] == c[1]).all() and (c[1] == c[2]).all()) for c in flat]
    assert abs(np.mean(is_grey) - 0.2) < 0.05  # 800 crops
    rot = MultiCropAugment(**{**QUIET, "rot90": True})
    turned = [c for crops in _crops(rot, 20) for c in crops]
    ks = {
        next(k for k in range(4) if torch.allclose(c, torch.rot90(ref, k, (1, 2)))) for c in turned
    }
    assert ks == {0, 1, 2, 3}
    hed = MultiCropAugment(**{**QUIET, "hed_jitter_p": 1.0})
    assert not torch.allclose(hed(TILE, (0, 0, 0))["global"][0], ref, atol=1e-3)
    # crops are resized bicubic (a 32 px tile to 20 px), as torchvision's RandomResizedCrop in GPFM
    small = MultiCropAugment(**{**QUIET, "global_crops_size": 20})(TILE, (0, 0, 0))["global"][0]
    bicubic = TF.resize(ref, [20, 20], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    bilinear = TF.resize(ref, [20, 20], InterpolationMode.BILINEAR, antialias=True)
    assert torch.allclose(small, bicubic, atol=1e-6) and not torch.allclose(
        small, bilinear, atol=1e-3
    )


# --- 7. heads and optimiser --------------------------------------------------------------


def test_heads_train_their_gains_and_freeze_last_layers_first(he_png: Path, tmp_path: Path) -> None:
    """Two frozen steps, then a free one: the DINO and expert heads' last layers (weights and
    gains) do not move while frozen and do after; the rest moves from the first step."""
    cfg = tiny(
        he_png,
        "optim.freeze_last_layer_steps=2",
        "optim.warmup_steps=0",
        "crops.local_crops_number=1",
    )
    state = build(cfg, tmp_path)
    heads = state.model.student
    eh = heads["expert_heads"]["tiny_expert"]
    assert eh.last_layer.bias is None
    assert torch.all(eh.last_layer.parametrizations.weight.original0 == 1)
    start = _params(heads)
    data = batches(state, 0)
    train_step(state, data)
    train_step(state, data)
    frozen = _params(heads)
    train_step(state, data)
    free = _params(heads)
    last = [n for n in start if "last_layer" in n]
    assert {n.split(".")[0] for n in last} == {"dino_head", "expert_heads"}
    assert any(n.endswith("original0") and n.startswith("dino_head") for n in last)
    for n in last:
        assert torch.equal(frozen[n], start[n]), n
        assert not torch.equal(free[n], frozen[n]), n
    assert not torch.equal(
        frozen["expert_heads.tiny_expert.proj.weight"],
        start["expert_heads.tiny_expert.proj.weight"],
    )


@pytest.mark.parametrize("token_wd", [True, False])
def test_weight_decay_covers_the_tokens(token_wd: bool) -> None:
    model = tiny_model()
    groups = {
        g["name"]: g["wd_multiplier"]
        for g in param_groups(
            model.student,
            num_layers=2,
            layerwise_decay=0.9,
            patch_embed_lr_mult=0.2,
            token_weight_decay=token_wd,
        )
    }
    for name in ("backbone.model.cls_token", "backbone.model.pos_embed", "backbone.mask_token"):
        assert groups[name] == (1.0 if token_wd else 0.0), name
    for name in ("backbone.model.blocks.0.norm1.weight", "backbone.model.blocks.0.ls1.gamma"):
        assert groups[name] == 0.0
    assert groups["backbone.model.blocks.0.attn.qkv.bias"] == 0.0
    assert groups["backbone.model.blocks.0.attn.qkv.weight"] == 1.0


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kl_option_scales_by_t_squared(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    kl = F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1), reduction="batchmean")
    assert ExpertCLSLoss("kl", temp)(s, t).item() == pytest.approx(temp**2 * kl.item(), rel=1e-6)
    assert load_config()["expert_loss"]["kl_temp"] == 1.0


# --- 8. schedule and the released step ----------------------------------------------------


def test_gpfm_schedule_spans_500k_steps_with_50k_warmup() -> None:
    cfg = load_config("gpfm")
    o = cfg["optim"]
    assert (o["total_steps"], o["warmup_steps"], o["batch_size"]) == (500_000, 50_000, 96)
    assert cfg["dino"]["centering"] == "centering"
    peak = scaled_lr(o["base_lr"], o["batch_size"] * 16, o["lr_ref_batch"])  # 2 nodes x 8 GPUs
    assert peak == pytest.approx(4.899e-4, rel=1e-3)
    s = Schedules.from_config(cfg, lr=peak)
    assert s.at(0)["lr"] == 0.0 and s.at(50_000)["lr"] == pytest.approx(peak)
    assert s.at(25_000)["lr"] == pytest.approx(peak / 2)
    assert s.at(1_249)["last_layer_lr"] == 0.0 and s.at(1_250)["last_layer_lr"] > 0
    assert s.at(37_500)["teacher_temp"] == pytest.approx(0.07)
    assert s.at(37_499)["teacher_temp"] < 0.07
    assert s.at(500_000)["lr"] == pytest.approx(1e-6) and s.at(0)["momentum"] == 0.992
    # the released GPFM: the teacher after 87,500 steps (GPFM's iteration 87,499)
    assert cfg["train"]["stop_at_step"] == 87_500
    assert s.at(87_499)["lr"] > 0.9 * peak  # still near the top of the cosine


def test_stop_at_step_ends_the_run_inside_its_schedule(he_png: Path, tmp_path: Path) -> None:
    items = ["optim.total_steps=6", "crops.local_crops_number=0", "train.checkpoint_every=1000"]
    first = train(tiny(he_png, *items, "train.stop_at_step=2"), tmp_path)
    assert first.step == 2
    rows = read_metrics(tmp_path / "metrics.csv")
    lr = first.schedules.at(1)["lr"]
    assert [int(r["step"]) for r in rows] == [1, 2] and float(rows[1]["lr"]) == pytest.approx(lr)
    assert first.schedules.total_steps == 6  # the schedule still spans the whole run
    done = train(tiny(he_png, *items), tmp_path, resume=True)
    assert done.step == 6


def test_fp16_overflow_skips_the_step_instead_of_stopping_the_run(
    he_png: Path, tmp_path: Path
) -> None:
    """GPFM trains in fp16 with a gradient scaler: an overflowing scaled gradient means "lower
    the scale and skip this step" (the scaler's job), not a diverged run."""
    cfg = tiny(he_png, "train.precision=fp16", "crops.local_crops_number=1", "optim.warmup_steps=0")
    state = build(cfg, tmp_path)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # beyond what fp16 holds
    student = state.model.student
    before = _params(student)
    data = batches(state, 0)
    values = train_step(state, data)
    assert not np.isfinite(values["grad_norm"]) and state.scaler.get_scale() == 2.0**23
    assert all(torch.equal(p, before[n]) for n, p in _params(student).items())  # skipped
    state.scaler.update(new_scale=256.0)
    values = train_step(state, data)
    assert np.isfinite(values["grad_norm"]) and np.isfinite(values["total"])
    assert any(not torch.equal(p, before[n]) for n, p in _params(student).items())
