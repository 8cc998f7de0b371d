"""``EncoderMeta``: everything a pipeline needs to know about an encoder, without torch.

The meta object is the single source of truth for preprocessing (input size, mean, std,
interpolation) and for the default tiling (how many pixels at which µm/px are read from a
slide before being resized to ``input_px``). It is JSON round-trippable so that it can be
embedded in safetensors checkpoints and HDF5 attributes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from gpfm_core.errors import EncoderError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "EncoderMeta"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EncoderMeta:
    """Static description of a registered encoder.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"gpfm"``.
    family : str
        Model family, e.g. ``"gpfm"``, ``"uni"``, ``"timm"``, ``"test"``.
    arch : str
        Architecture: a timm model name (e.g. ``"vit_large_patch14_dinov2"``) or a free
        description for non-timm models.
    embed_dim : int
        Feature dimension ``D`` of ``encoder(x) -> (B, D)``.
    input_px : int
        Network input side in pixels; ``preprocess`` resizes tiles to ``(input_px, input_px)``.
    patch_size : int or None
        ViT patch side in pixels (None for non-ViT models).
    mean, std : tuple of 3 float
        Per-channel normalisation applied to RGB in ``[0, 1]``.
    interpolation : {"bicubic", "bilinear", "nearest"}
        Resize filter used by ``preprocess``.
    tile_px : int
        Default tile side read from a slide, in pixels at ``tile_mpp``.
    tile_mpp : float
        Default resolution (µm/px) tiles are read at; the field of view is ``tile_px * tile_mpp`` µm.
    precision : {"fp32", "bf16", "fp16"}
        Recommended inference precision on an accelerator (CPU always runs fp32).
    license : str
        Licence of the published weights.
    source : str
        Where the model and weights come from (URL / repository).
    description : str
        One-line human description.
    weights_required : bool
        True when meaningful features need a weights file (False for test encoders).
    hf_repo, hf_filename : str or None
        Hugging Face Hub location of the weights, if published there.
    """

    name: str
    family: str
    arch: str
    embed_dim: int
    input_px: int
    patch_size: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    tile_px: int = 224
    tile_mpp: float = 0.5
    precision: str = "fp32"
    license: str = "unknown"
    source: str = ""
    description: str = ""
    weights_required: bool = True
    hf_repo: str | None = None
    hf_filename: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EncoderError(
                f"encoder {self.name!r}: mean and std need 3 values each, std > 0 "
                f"(got mean={self.mean}, std={self.std})"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise EncoderError(
                f"encoder {self.name!r}: interpolation must be one of {_INTERPOLATIONS}, "
                f"got {self.interpolation!r}"
            )
        if self.precision not in _PRECISIONS:
            raise EncoderError(
                f"encoder {self.name!r}: precision must be one of {_PRECISIONS}, got {self.precision!r}"
            )
        for attr in ("embed_dim", "input_px", "tile_px"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EncoderError(
                    f"encoder {self.name!r}: {attr} must be a positive int, got {value!r}"
                )
        if not self.tile_mpp > 0:
            raise EncoderError(
                f"encoder {self.name!r}: tile_mpp must be > 0, got {self.tile_mpp!r}"
            )
        object.__setattr__(self, "tile_mpp", float(self.tile_mpp))

    @property
    def field_of_view_um(self) -> float:
        """Side of the default tile in µm (``tile_px * tile_mpp``)."""
        return self.tile_px * self.tile_mpp

    def replace(self, **changes: Any) -> EncoderMeta:
        """Return a copy with ``changes`` applied (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise EncoderError(
                f"unknown EncoderMeta field(s) {unknown}: valid are {self.field_names()}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the dataclass fields, in order."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    def to_json(self) -> str:
        """Compact JSON string of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderMeta:
        """Build from :meth:`to_dict` output; unknown keys are ignored (newer writers)."""
        if not isinstance(data, dict):
            raise EncoderError(f"encoder metadata must be a JSON object, got {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in cls.field_names()}
        missing = [k for k in ("name", "family", "arch", "embed_dim", "input_px") if k not in known]
        if missing:
            raise EncoderError(f"encoder metadata lacks {missing}: re-export the checkpoint")
        known.setdefault("patch_size", None)
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> EncoderMeta:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EncoderError(
                f"encoder metadata is not valid JSON ({exc}): re-export the checkpoint"
            ) from exc
        return cls.from_dict(data)
