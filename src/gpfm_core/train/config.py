"""Layered training configuration: packaged defaults, an override file, ``--set key=value``.

The packaged ``configs/default.yaml`` lists every key (GPFM's recipe values, with run settings
that work on any machine). An override file (a packaged one: ``gpfm`` = exactly the paper's
ViT-L run, ``tiny_cpu``, ``student_s``; or the user's) and ``--set`` items may only change
existing keys; anything else is a :class:`~gpfm_core.errors.ConfigError` naming the key.
``student.kwargs`` is free-form (passed to ``timm.create_model``); ``experts`` is a list of
``{name, weights: {cls, patch}, pretrained, input, target}`` items. ``docs/recipe_card.md``
lists every value of ``gpfm`` with its source in GPFM's repository.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gpfm_core.errors import ConfigError

__all__ = [
    "dump_config",
    "get_path",
    "load_config",
    "packaged_config",
    "packaged_names",
    "parse_set_items",
    "validate_config",
]

log = logging.getLogger(__name__)

FREEFORM: frozenset[str] = frozenset({"student.kwargs"})
EXPERT_KEYS: frozenset[str] = frozenset({"name", "weights", "pretrained", "input", "target"})
EXPERT_WEIGHT_KEYS: frozenset[str] = frozenset({"cls", "patch"})
#: What an expert sees: ``crop`` = the student's global crop as the student sees it (its size,
#: its mean/std; GPFM), ``native`` = resized to the expert's input size, its own mean/std.
EXPERT_INPUTS = ("crop", "native")
#: What an expert's head predicts: ``embedding`` = the encoder's feature (what ``gpfm embed``
#: stores), ``contrastive`` = its projected, L2-normalised contrastive embedding (CONCH; GPFM).
EXPERT_TARGETS = ("embedding", "contrastive")
#: An item that does not say: what the expert's authors feed it, its own feature. The packaged
#: configs list GPFM's three experts with GPFM's choice (``crop``; CONCH ``contrastive``).
EXPERT_DEFAULTS = {"input": "native", "target": "embedding"}
#: ``student.init_weights`` value of a config that must start from given weights (``gpfm``).
REQUIRED = "required"
#: Allowed values of the string-choice keys.
CHOICES: dict[str, tuple[str, ...]] = {
    "dino.centering": ("sinkhorn_knopp", "centering"),
    "dino.koleo_reduction": ("sum", "mean"),
    "expert_loss.cls_type": ("cosine", "kl"),
    "optim.clip_grad_mode": ("per_module", "joint"),
    "crops.interpolation": ("bicubic", "bilinear"),
    "train.strategy": ("ddp", "fsdp"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
}


def packaged_names() -> list[str]:
    """Names of the packaged configs (``default``, ``gpfm``, ``student_s``, ``tiny_cpu``)."""
    folder = resources.files("gpfm_core.train").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def packaged_config(name: str = "default") -> Path:
    """Path of a packaged config (see :func:`packaged_names`)."""
    path = Path(str(resources.files("gpfm_core.train").joinpath("configs", f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError(f"no packaged config {name!r}: use one of {', '.join(packaged_names())}")
    return path


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        # a bare name refers to a packaged config
        if path.suffix == "" and path.parent == Path("."):
            path = packaged_config(str(path))
        else:
            raise ConfigError(f"config file {path} not found: pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid YAML ({msg}): fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_leaf(key: str, default: Any, value: Any) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif _is_num(default):
        ok = _is_num(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"config key {key!r} needs a {type(default).__name__} (like {default!r}), got {value!r}"
        )


def _coerce(default: Any, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: turn numeric strings into floats for numeric keys."""
    if _is_num(default) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: str = "") -> None:
    unknown = sorted(f"{prefix}{k}" for k in over if k not in base)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}: see gpfm_core/train/configs/default.yaml"
        )
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if dotted in FREEFORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a mapping, got {value!r}")
            base[key] = {**base[key], **value}
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a mapping, got {value!r}")
            _merge(base[key], value, prefix=f"{dotted}.")
        else:
            value = _coerce(base[key], value)
            _check_leaf(dotted, base[key], value)
            base[key] = copy.deepcopy(value)


def _validate_experts(experts: Any) -> list[dict[str, Any]]:
    if not isinstance(experts, list):
        raise ConfigError(f"config key 'experts' must be a list, got {experts!r}")
    out = []
    for i, item in enumerate(experts):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(
                f"experts[{i}] needs a 'name' (e.g. {{name: uni, weights: {{cls: 1.0}}}})"
            )
        unknown = sorted(set(item) - EXPERT_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) experts[{i}].{', '.join(unknown)}: use {', '.join(sorted(EXPERT_KEYS))}"
            )
        for key, allowed in (("input", EXPERT_INPUTS), ("target", EXPERT_TARGETS)):
            if item.get(key, EXPERT_DEFAULTS[key]) not in allowed:
                raise ConfigError(
                    f"experts[{i}].{key} must be {' or '.join(allowed)}, got {item[key]!r}"
                )
        weights = item.get("weights") or {}
        unknown = sorted(set(weights) - EXPERT_WEIGHT_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) experts[{i}].weights.{', '.join(unknown)}: use cls, patch"
            )
        w = {"cls": float(weights.get("cls", 1.0)), "patch": float(weights.get("patch", 0.0))}
        if min(w.values()) < 0:
            raise ConfigError(f"experts[{i}] weights must be >= 0, got {w}")
        out.append(
            {
                "name": str(item["name"]),
                "weights": w,
                "pretrained": bool(item.get("pretrained", True)),
                "input": str(item.get("input", EXPERT_DEFAULTS["input"])),
                "target": str(item.get("target", EXPERT_DEFAULTS["target"])),
            }
        )
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"experts list names an expert twice ({names}): list each once")
    return out


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check value ranges the trainer relies on; returns ``cfg`` (experts normalised)."""
    cfg["experts"] = _validate_experts(cfg["experts"])
    o, c, t = cfg["optim"], cfg["crops"], cfg["train"]
    for key in ("batch_size", "accum_steps", "total_steps"):
        if not isinstance(o[key], int) or o[key] < 1:
            raise ConfigError(f"optim.{key} must be an int >= 1, got {o[key]!r}")
    for key in ("log_every", "checkpoint_every"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"train.{key} must be an int >= 1, got {t[key]!r}")
    for key, allowed in CHOICES.items():
        value = get_path(cfg, key)
        if value not in allowed:
            shown = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
            raise ConfigError(f"{key} must be {shown}, got {value!r}")
    for key in ("stop_after", "stop_at_step"):
        if t[key] is not None and (not isinstance(t[key], int) or t[key] < 1):
            raise ConfigError(f"train.{key} must be null or an int >= 1, got {t[key]!r}")
    init = cfg["student"]["init_weights"]
    if init is not None and not (isinstance(init, str) and init):
        raise ConfigError(
            f"student.init_weights must be a file path, {REQUIRED!r} or null, got {init!r}"
        )
    if init is not None and cfg["student"]["pretrained"]:
        raise ConfigError(
            "student.pretrained and student.init_weights are both set: start from one of them"
        )
    k = c["blur_kernel_size"]
    if k is not None and (not isinstance(k, int) or k < 3 or k % 2 == 0):
        raise ConfigError(f"crops.blur_kernel_size must be an odd int >= 3 or null, got {k!r}")
    for key in ("global_crops_scale", "local_crops_scale"):
        lo, hi = c[key]
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crops.{key} must be [lo, hi] with 0 < lo <= hi <= 1, got {c[key]}")
    lo, hi = cfg["ibot"]["mask_ratio_min_max"]
    if not 0 <= lo <= hi < 1:
        raise ConfigError(f"ibot.mask_ratio_min_max must be [lo, hi] within [0, 1), got {[lo, hi]}")
    dev = str(cfg["device"])
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    used = any(e["weights"]["cls"] or e["weights"]["patch"] for e in cfg["experts"])
    if not (
        used
        or cfg["dino"]["loss_weight"]
        or cfg["ibot"]["loss_weight"]
        or cfg["dino"]["koleo_loss_weight"]
    ):
        raise ConfigError("every loss weight is 0: enable dino, ibot, koleo or an expert")
    return cfg


def parse_set_items(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["optim.base_lr=1e-3", ...]`` into a nested override dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set optim.base_lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})"
            ) from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set on {part!r}")
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Sequence[str] | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Resolve the training config.

    Parameters
    ----------
    path : str or Path, optional
        Override YAML file, or a packaged config name (``gpfm``, ``tiny_cpu``, ``student_s``).
    overrides : list of "key=value" strings or nested dict, optional
        Applied last (``--set``).

    Returns
    -------
    dict
        The complete, validated config (every key of ``default.yaml``).
    """
    cfg = _read_yaml(packaged_config("default"))
    if path is not None:
        _merge(cfg, _read_yaml(path))
    if overrides:
        over = overrides if isinstance(overrides, dict) else parse_set_items(overrides)
        _merge(cfg, copy.deepcopy(over))
    return validate_config(cfg)


def get_path(cfg: dict[str, Any], dotted: str) -> Any:
    """``get_path(cfg, "optim.base_lr")``."""
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def dump_config(cfg: dict[str, Any]) -> str:
    """The resolved config as YAML text (saved with the run and in checkpoints)."""
    return yaml.safe_dump(cfg, sort_keys=False)
