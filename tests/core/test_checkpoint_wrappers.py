"""Checkpoints in the wrappers people save them in, each written by the real producer's code.

Every case builds a real torch model (the ``tiny-vit`` timm ViT), wraps it the way the tool
in question saves it, and asserts that ``create_encoder(..., weights=file)`` gives exactly the
features of the weights that should be used (the EMA / averaged / teacher copy where there is
one), and that ``weights_origin`` says where they were found.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gpfm_core.encoders import create_encoder, read_checkpoint
from gpfm_core.errors import EncoderError


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def _timm_vit(seed: int) -> nn.Module:
    return create_encoder("tiny-vit", pretrained=False, seed=seed).model


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A copy with every float tensor moved: a training step's worth of change, well above noise."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


class _LossWithCentre(nn.Module):
    """A loss with state, as DINO-style and contrastive losses keep (a centre / a queue)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.randn(1, dim))
        self.register_buffer("queue", torch.randn(8, dim))


class _LitModule(nn.Module):
    """The module tree of a LightningModule that trains a timm backbone with a stateful loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = _LossWithCentre(32)


def _swa(tmp_path: Path) -> tuple[Path, nn.Module, str]:
    base = _timm_vit(1)
    swa = torch.optim.swa_utils.AveragedModel(base)
    swa.update_parameters(_perturbed(base, 7))  # n_averaged 2: the mean of two copies
    assert "n_averaged" in swa.state_dict()
    path = tmp_path / "swa.pt"
    torch.save(swa.state_dict(), path)
    return path, swa.module, "module"


def _swa_of_ddp_in_dict(tmp_path: Path) -> tuple[Path, nn.Module, str]:
    base = _timm_vit(2)
    holder = nn.Module()
    holder.module = base  # what DistributedDataParallel.state_dict() names its model
    swa = torch.optim.swa_utils.AveragedModel(holder)
    swa.update_parameters(holder)
    path = tmp_path / "swa_ddp.pth"
    torch.save({"model": swa.state_dict(), "epoch": 9}, path)
    return path, swa.module.module, "model > module.module"


def _timm_train(tmp_path: Path) -> tuple[Path, nn.Module, str]:
    """timm's own ``CheckpointSaver`` with a ``ModelEmaV3``, as ``timm/train.py`` runs it."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = _timm_vit(3)
    ema = ModelEmaV3(model, decay=0.5)
    trained = _perturbed(model, 8)
    model.load_state_dict(trained.state_dict())
    ema.update(model)  # EMA = 0.5 * initial + 0.5 * trained: differs from the model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = argparse.Namespace(model="vit_small_patch14_dinov2", lr=1e-3, epochs=1)
    saver = CheckpointSaver(
        model, opt, args=args, model_ema=ema, checkpoint_dir=str(tmp_path), max_history=1
    )
    saver.save_checkpoint(epoch=0, metric=0.5)
    path = tmp_path / "model_best.pth.tar"
    assert path.is_file()
    return path, ema.module, "state_dict_ema"


def _lightning(tmp_path: Path) -> tuple[Path, nn.Module, str]:
    """The dict ``lightning.Trainer.save_checkpoint`` writes (2.x), around a real module."""
    lit = _LitModule(_timm_vit(4))
    opt = torch.optim.AdamW(lit.parameters(), lr=1e-3)
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": lit.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": None}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "backbone": "vit_small_patch14_dinov2"},
    }
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(ckpt, path)
    return path, lit.model, "state_dict > model"


def _lightning_with_ema(tmp_path: Path) -> tuple[Path, nn.Module, str]:
    """An EMA kept as a sibling module (``self.model_ema``) of a LightningModule."""
    lit = _LitModule(_timm_vit(5))
    lit.model_ema = _perturbed(lit.model, 9)
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": lit.state_dict(), "epoch": 1}, path)
    return path, lit.model_ema, "state_dict > model_ema"


def _bf16(tmp_path: Path, suffix: str) -> tuple[Path, nn.Module, str]:
    model = _timm_vit(6)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path / f"bf16{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd}, path)
    ref = copy.deepcopy(model)  # the bf16 values, held as float32: what the encoder must hold
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    return path, ref, "" if suffix == ".safetensors" else "model"


CASES: dict[str, Callable[[Path], tuple[Path, nn.Module, str]]] = {
    "swa-averaged-model": _swa,
    "swa-of-ddp-in-dict": _swa_of_ddp_in_dict,
    "timm-train-ema": _timm_train,
    "lightning": _lightning,
    "lightning-ema-sibling": _lightning_with_ema,
    "bf16-safetensors": lambda p: _bf16(p, ".safetensors"),
    "bf16-pth": lambda p: _bf16(p, ".pth"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrapped_checkpoint_loads_the_right_weights(
    tmp_path: Path, x: torch.Tensor, case: str
) -> None:
    path, expected_model, origin = CASES[case](tmp_path)
    enc = create_encoder("tiny-vit", weights=path)
    assert enc.weights_origin == origin
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    want = _features(expected_model, x)
    assert torch.equal(_features(enc, x), want)
    # the test can fail: another seed's weights give other features
    assert not torch.allclose(_features(_timm_vit(0), x), want, atol=1e-3)


def test_timm_checkpoint_says_the_ema_weights_were_used(
    tmp_path: Path, x: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    path, ema_model, _ = _timm_train(tmp_path)
    raw = torch.load(path, map_location="cpu", weights_only=False)  # our own file, in a test
    plain = _timm_vit(0)
    plain.load_state_dict(raw["state_dict"])
    assert not torch.allclose(_features(plain, x), _features(ema_model, x), atol=1e-3)
    with caplog.at_level(logging.INFO, logger="gpfm_core.encoders"):
        sd, origin = read_checkpoint(path)
    assert origin == "state_dict_ema"
    assert any(
        "EMA weights under 'state_dict_ema'" in r.getMessage() and "state_dict" in r.getMessage()
        for r in caplog.records
    )
    assert torch.equal(sd["cls_token"], ema_model.state_dict()["cls_token"])


def test_swa_bookkeeping_is_dropped_and_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, model, _ = _swa(tmp_path)
    with caplog.at_level(logging.INFO, logger="gpfm_core.encoders"):
        sd, origin = read_checkpoint(path)
    assert origin == "module" and set(sd) == set(model.state_dict())
    assert any("n_averaged" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: torch.optim.swa_utils.AveragedModel(m).state_dict(),
        lambda m: {"state_dict": _LitModule(m).state_dict(), "epoch": 1},
    ],
    ids=["swa", "lightning"],
)
def test_a_different_architecture_still_names_the_key_difference(
    tmp_path: Path, wrap: Callable[[nn.Module], dict]
) -> None:
    """Tolerating bookkeeping keys must not hide a real mismatch: 3 blocks in, 2 expected."""
    three_blocks = create_encoder("tiny-vit", pretrained=False, depth=3).model
    path = tmp_path / "other.pth"
    torch.save(wrap(three_blocks), path)
    with pytest.raises(EncoderError) as err:
        create_encoder("tiny-vit", weights=path)
    msg = str(err.value)
    assert "\n" not in msg and "do not fit this architecture" in msg
    assert "unexpected" in msg and "blocks.2." in msg
    assert "n_averaged" not in msg and "criterion" not in msg and "module." not in msg
