"""Unit tests of the training pieces: losses, heads, masks, augmentation, schedules, optimiser."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpfm_core.train.augment import MultiCropAugment
from gpfm_core.train.checkpoint import get_rng_state, set_rng_state
from gpfm_core.train.heads import DINOHead, ExpertHead
from gpfm_core.train.losses import (
    DINOLoss,
    ExpertCLSLoss,
    ExpertPatchLoss,
    KoLeoLoss,
    iBOTPatchLoss,
)
from gpfm_core.train.masking import block_mask, sample_masks
from gpfm_core.train.optim import param_groups, scaled_lr
from gpfm_core.train.schedules import Schedules, cosine

torch.set_num_threads(1)


def test_dino_loss_matches_hand_computation_and_centres() -> None:
    torch.manual_seed(0)
    loss = DINOLoss(5, student_temp=0.1, center_momentum=0.9)
    s = torch.randn(3, 4, 5)  # 2 global + 1 local crops, batch 4, 5 prototypes
    t_logits = torch.randn(2 * 4, 5)
    t = loss.softmax_center_teacher(t_logits, 0.04).view(2, 4, 5)
    logp = F.log_softmax(s / 0.1, dim=-1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-(t[a] * logp[b]).sum(-1).mean() for a, b in pairs) / len(pairs)
    assert loss(s, t).item() == pytest.approx(expected.item(), rel=1e-6)
    loss.update_center(t_logits)
    assert torch.allclose(loss.center, 0.1 * t_logits.mean(0, keepdim=True))
    # matching a one-hot teacher with the same peak scores lower than a wrong peak
    onehot = F.one_hot(torch.tensor([1, 2, 3, 4]), 5).float().expand(2, 4, 5)
    good = 10 * onehot[0].expand(3, 4, 5)
    bad = 10 * F.one_hot(torch.tensor([0, 0, 0, 0]), 5).float().expand(3, 4, 5)
    assert loss(good, onehot) < loss(bad, onehot)


def test_sinkhorn_knopp_targets_are_equipartitioned() -> None:
    torch.manual_seed(0)
    loss = DINOLoss(16, student_temp=0.1)
    # prototype logits are cosines (weight-normalised last layer on an L2-normalised input)
    logits = F.normalize(torch.randn(64, 8), dim=1) @ F.normalize(torch.randn(16, 8), dim=1).T
    logits[:, 3] = 0.95  # a prototype every sample prefers: softmax would pile onto it
    q = loss.teacher_targets(logits, 0.05, "sinkhorn_knopp")
    assert q.shape == (64, 16) and torch.isfinite(q).all() and (q >= 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    # DINOv2's 3 iterations spread the mass over the prototypes (a fair share is 64/16 = 4)...
    assert float(q.sum(dim=0).max()) < 10 and float(q.sum(dim=0).min()) > 1
    soft = F.softmax(logits / 0.05, dim=-1)
    assert float(soft.sum(dim=0)[3]) > 40  # ... where the plain softmax piles onto one
    # and iterating to convergence equipartitions exactly
    full = loss.sinkhorn_knopp_teacher(logits, 0.05, n_iterations=200)
    assert float((full.sum(dim=0) - 4.0).abs().max()) < 0.05
    # no state: the EMA centre is untouched, and a global shift changes nothing
    assert torch.all(loss.center == 0)
    shifted = loss.teacher_targets(logits + 30.0, 0.05, "sinkhorn_knopp")
    assert torch.allclose(q, shifted, atol=1e-5)
    # each sample still favours its own best prototype where the batch allows it
    per_sample = 0.2 * torch.rand(16, 16) + 0.7 * torch.eye(16)
    assert torch.equal(
        loss.teacher_targets(per_sample, 0.05, "sinkhorn_knopp").argmax(1), torch.arange(16)
    )
    # an empty set of rows (no masked patch this step) is not an error
    assert loss.teacher_targets(torch.empty(0, 16), 0.05, "sinkhorn_knopp").shape == (0, 16)
    with pytest.raises(ValueError, match="centering"):
        loss.teacher_targets(logits, 0.05, "softmax")


def test_ema_centring_updates_from_targets_and_ignores_empty_steps() -> None:
    loss = iBOTPatchLoss(8, center_momentum=0.9)
    logits = torch.randn(10, 8)
    probs = loss.teacher_targets(logits, 0.04, "centering")
    assert torch.allclose(probs, F.softmax(logits / 0.04, dim=-1), atol=1e-6)
    assert torch.allclose(loss.center, 0.1 * logits.mean(0, keepdim=True), atol=1e-6)
    before = loss.center.clone()
    loss.teacher_targets(torch.empty(0, 8), 0.04, "centering")
    assert torch.equal(loss.center, before) and torch.isfinite(loss.center).all()


def test_ibot_koleo_and_expert_losses() -> None:
    torch.manual_seed(0)
    ib = iBOTPatchLoss(6)
    s, tl = torch.randn(7, 6), torch.randn(7, 6)
    tp = ib.softmax_center_teacher(tl, 0.07)
    w = torch.full((7,), 1 / 7)
    manual = (-(tp * F.log_softmax(s / 0.1, -1)).sum(-1) * w).sum() / 2
    assert ib(s, tp, w, 2).item() == pytest.approx(manual.item(), rel=1e-6)
    koleo = KoLeoLoss()
    clustered = torch.randn(1, 8) + 1e-3 * torch.randn(16, 8)
    spread = torch.randn(16, 8)
    assert koleo(clustered) > koleo(spread) + 3
    e = torch.randn(5, 12)
    cls_loss = ExpertCLSLoss()
    assert cls_loss(3 * e, e).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    assert cls_loss(-e, e).item() == pytest.approx(2.0, abs=1e-5)
    kl = ExpertCLSLoss("kl", temp=0.5)
    assert kl(e, e).item() == pytest.approx(0.0, abs=1e-6) and kl(-e, e) > 0
    p = ExpertPatchLoss(0.9, 0.1)
    pe = torch.randn(2, 9, 12)
    assert p(pe, pe).item() == pytest.approx(0.0, abs=1e-6)
    expected = 0.9 * (1 - F.cosine_similarity(2 * pe, pe, dim=-1)).mean() + 0.1 * F.smooth_l1_loss(
        2 * pe, pe
    )
    assert p(2 * pe, pe).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="cosine or kl"):
        ExpertCLSLoss("l2")


def test_heads_shapes_and_normalisation() -> None:
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    out = head(torch.randn(4, 16))
    assert out.shape == (4, 32)
    # prototypes are unit vectors and the bottleneck is L2-normalised: |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.all(g == 1)  # DINOv2: starts at 1, trained
    frozen = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, train_gain=False)
    assert not frozen.last_layer.parametrizations.weight.original0.requires_grad
    eh = ExpertHead(16, 48, hidden_dim=8)
    assert eh(torch.randn(2, 5, 16)).shape == (2, 5, 48)


def test_block_masks_ratio_and_half_the_crops() -> None:
    rng = np.random.default_rng(0)
    m = block_mask(rng, (16, 16), 80)
    assert 0 < m.sum() <= 80
    masks = sample_masks(
        np.random.default_rng(1), 8, (16, 16), probability=0.5, ratio_min_max=(0.1, 0.5)
    )
    assert masks.shape == (8, 256)
    assert (masks.sum(1) > 0).sum() == 4  # half the crops masked
    ratios = masks.sum(1)[masks.sum(1) > 0] / 256
    assert ratios.min() >= 0.04 and ratios.max() <= 0.5


def test_multicrop_is_seeded_and_shaped() -> None:
    aug = MultiCropAugment(global_crops_size=32, local_crops_number=3, local_crops_size=16)
    tile = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a, b, c = aug(tile, (0, 1, 2)), aug(tile, (0, 1, 2)), aug(tile, (0, 1, 3))
    assert [x.shape for x in a["global"]] == [(3, 32, 32)] * 2
    assert [x.shape for x in a["local"]] == [(3, 16, 16)] * 3
    assert all(
        torch.equal(x, y)
        for x, y in zip(a["global"] + a["local"], b["global"] + b["local"], strict=True)
    )
    assert not torch.equal(a["global"][0], c["global"][0])
    assert float(a["global"][1].min()) >= 0 and float(a["global"][1].max()) <= 1


def test_schedules_follow_the_recipe() -> None:
    assert cosine(0, 100, 1.0, 0.0, warmup=10) == 0.0
    assert cosine(10, 100, 1.0, 0.0, warmup=10) == pytest.approx(1.0)
    assert cosine(100, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    s = Schedules(100, 10, 4e-4, 1e-6, 0.04, 0.4, 0.992, 1.0, 0.04, 0.07, 30, 5)
    v0, v_mid, v_end = s.at(0), s.at(15), s.at(100)
    assert v0["wd"] == pytest.approx(0.04) and v_end["wd"] == pytest.approx(0.4)
    assert v0["momentum"] == pytest.approx(0.992) and v_end["momentum"] == pytest.approx(1.0)
    assert v0["teacher_temp"] == pytest.approx(0.04) and v_mid["teacher_temp"] == pytest.approx(
        0.055
    )
    assert s.at(40)["teacher_temp"] == pytest.approx(0.07)
    assert s.at(3)["last_layer_lr"] == 0.0 and s.at(6)["last_layer_lr"] == s.at(6)["lr"] > 0
    assert scaled_lr(4e-4, 256) == pytest.approx(2e-4)


def test_param_groups_layer_decay_and_no_weight_decay() -> None:
    from gpfm_core.train.models import StudentBackbone

    bb = StudentBackbone(
        "vit_small_patch14_dinov2", {"img_size": 28, "embed_dim": 32, "depth": 3, "num_heads": 2}
    )
    student = torch.nn.ModuleDict(
        {"backbone": bb, "dino_head": DINOHead(32, 8, hidden_dim=16, bottleneck_dim=8)}
    )
    groups = {
        g["name"]: g
        for g in param_groups(student, num_layers=3, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    }
    lr = {k: g["lr_multiplier"] for k, g in groups.items()}
    assert lr["backbone.model.blocks.0.attn.qkv.weight"] == pytest.approx(0.9**3)
    assert lr["backbone.model.blocks.2.attn.qkv.weight"] == pytest.approx(0.9)
    assert lr["backbone.model.patch_embed.proj.weight"] == pytest.approx(0.9**4 * 0.2)
    assert lr["dino_head.mlp.0.weight"] == 1.0
    assert groups["backbone.model.blocks.0.norm1.weight"]["wd_multiplier"] == 0.0
    assert groups["backbone.model.blocks.0.attn.qkv.bias"]["wd_multiplier"] == 0.0
    assert groups["backbone.model.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert groups["dino_head.last_layer.parametrizations.weight.original1"]["is_last_layer"]
    assert groups["dino_head.last_layer.parametrizations.weight.original0"]["is_last_layer"]


def test_student_mask_token_replaces_masked_patches() -> None:
    from gpfm_core.train.models import StudentBackbone

    torch.manual_seed(0)
    bb = StudentBackbone(
        "vit_small_patch14_dinov2",
        {"img_size": 28, "embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": 1.0},
    ).eval()
    x = torch.randn(2, 3, 28, 28)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.allclose(bb(x, masks)["patch"], bb(x)["patch"])
    masks[0, 1] = True
    out = bb(x, masks)
    assert out["patch"].shape == (2, 4, 32) and out["cls"].shape == (2, 32)
    assert not torch.allclose(out["patch"][0], bb(x)["patch"][0])
    assert torch.allclose(out["patch"][1], bb(x)["patch"][1])
    assert bb(torch.randn(1, 3, 56, 56))["patch"].shape == (
        1,
        16,
        32,
    )  # dynamic size (local/global)


def test_rng_state_roundtrip_is_tensor_only() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=True)  # no pickled Python objects inside
    assert (
        torch.equal(again["torch"], state["torch"]) and again["python_state"].dtype == torch.int64
    )
