"""Layered training config: packaged defaults, override files, --set, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpfm_core.errors import ConfigError
from gpfm_core.train.config import dump_config, load_config, packaged_config, parse_set_items


def test_packaged_configs_resolve_with_paper_defaults() -> None:
    cfg = load_config()
    assert cfg["student"]["arch"] == "vit_large_patch14_dinov2"
    assert [e["name"] for e in cfg["experts"]] == ["uni", "phikon", "conch"]
    assert cfg["experts"][1]["weights"] == {"cls": 0.5, "patch": 0.125}
    assert cfg["experts"][2]["weights"] == {"cls": 1.0, "patch": 0.0}
    assert cfg["crops"]["local_crops_number"] == 8 and cfg["crops"]["local_crops_size"] == 98
    assert cfg["dino"]["centering"] == "centering"  # GPFM's ViT-L run: EMA centring
    tiny = load_config("tiny_cpu")
    assert tiny["student"]["kwargs"]["embed_dim"] == 64
    assert tiny["student"]["kwargs"]["init_values"] == 1e-5  # free-form kwargs merged
    assert tiny["dino"]["koleo_loss_weight"] == 0.1  # untouched defaults kept
    assert tiny["dino"]["centering"] == "sinkhorn_knopp"  # short runs: DINOv2's targets
    student = load_config("student_s")
    assert [e["name"] for e in student["experts"]] == ["hed-texture"]
    assert student["expert_loss"]["standardize"] is True
    assert load_config("gpfm")["student"]["init_weights"] == "required"


def test_override_file_and_set_items_layer_in_order(tmp_path: Path) -> None:
    f = tmp_path / "over.yaml"
    f.write_text("optim: {base_lr: 1e-3, batch_size: 4}\nstudent: {kwargs: {depth: 3}}\n")
    cfg = load_config(
        f, overrides=["optim.batch_size=2", "experts=[{name: tiny-vit, weights: {cls: 2}}]"]
    )
    assert cfg["optim"]["base_lr"] == pytest.approx(1e-3)  # YAML 1.1 string '1e-3' coerced
    assert cfg["optim"]["batch_size"] == 2  # --set wins over the file
    assert cfg["student"]["kwargs"]["depth"] == 3
    assert cfg["experts"] == [
        {
            "name": "tiny-vit",
            "weights": {"cls": 2.0, "patch": 0.0},
            "pretrained": True,
            "input": "native",  # what the expert's authors feed it, unless an item says
            "target": "embedding",
        }
    ]
    again = load_config(f, overrides=parse_set_items(["optim.batch_size=2"]))
    assert again["optim"]["batch_size"] == 2
    assert "base_lr: 0.001" in dump_config(cfg)


@pytest.mark.parametrize(
    ("over", "named"),
    [
        ({"optimm": {"lr": 1}}, "optimm"),
        ({"optim": {"base_lrr": 1.0}}, "optim.base_lrr"),
        ({"crops": {"global_crops_size": 224, "bogus": 1, "other": 2}}, "crops.bogus, crops.other"),
        ({"experts": [{"name": "uni", "weight": {"cls": 1}}]}, "experts[0].weight"),
        ({"experts": [{"name": "uni", "weights": {"clss": 1}}]}, "experts[0].weights.clss"),
        ({"experts": [{"name": "uni", "inputs": "crop"}]}, "experts[0].inputs"),
        ({"student": {"init_weight": "x.pth"}}, "student.init_weight"),
    ],
)
def test_unknown_keys_are_named(over: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")) as info:
        load_config(overrides=over)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["optim.batch_size=many"], "optim.batch_size"),
        (["optim.batch_size=0"], "batch_size must be an int >= 1"),
        (["train.precision=fp8"], "train.precision"),
        (["device=tpu"], "device"),
        (["dino.centering=softmax"], "dino.centering must be sinkhorn_knopp or centering"),
        (["train.strategy=zero3"], "train.strategy must be ddp or fsdp"),
        (["crops.global_crops_scale=[0.5, 0.2]"], "global_crops_scale"),
        (["optim"], "not key=value"),
        (
            ["dino.loss_weight=0", "ibot.loss_weight=0", "dino.koleo_loss_weight=0", "experts=[]"],
            "every loss weight is 0",
        ),
        (["experts=[uni, uni]"], "twice"),
        (["experts=[{name: uni, input: resized}]"], "experts.0..input must be crop or native"),
        (["experts=[{name: conch, target: proj}]"], "target must be embedding or contrastive"),
        (["optim.clip_grad_mode=global"], "optim.clip_grad_mode must be per_module or joint"),
        (["dino.koleo_reduction=max"], "dino.koleo_reduction must be sum or mean"),
        (["crops.interpolation=nearest"], "crops.interpolation must be bicubic or bilinear"),
        (["crops.blur_kernel_size=8"], "blur_kernel_size must be an odd int"),
        (["train.stop_at_step=0"], "stop_at_step must be null or an int >= 1"),
        (["student.init_weights=3"], "student.init_weights must be a file path"),
        (["student.pretrained=true", "student.init_weights=a.pth"], "both set"),
    ],
)
def test_bad_values_raise_config_error(items: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=items)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no packaged config 'huge': use one of default, gpfm"):
        packaged_config("huge")


def test_cli_parser_is_light_and_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    code = (
        "import sys; from gpfm_core.cli import build_parser; build_parser();"
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpfm_core",
            "train",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "optim.bogus=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.bogus" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()
