"""``gpfm-student``: the small distilled GPFM student that ships inside the package.

Its weights live at ``gpfm_core/encoders/weights/gpfm_student.safetensors`` (override with
``GPFM_STUDENT_WEIGHTS``), written by :func:`save_encoder_safetensors` with the architecture and
meta embedded, so whatever the training run produced (width, depth, tiling) is what loads. Until
that file exists the registry lists a ViT-Ti/14 placeholder meta and building raises
:class:`EncoderError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._meta import IMAGENET_MEAN, IMAGENET_STD, EncoderMeta
from gpfm_core.encoders._registry import register_encoder
from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    from gpfm_core.encoders._base import Encoder

__all__ = ["STUDENT_ARCH", "STUDENT_KWARGS", "STUDENT_META", "student_weights_path"]

STUDENT_ENV = "GPFM_STUDENT_WEIGHTS"
STUDENT_ARCH = "vit_small_patch14_dinov2"
#: ViT-Ti/14, DINOv2-style (LayerScale, CLS feature after the final norm).
STUDENT_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 14,
    "embed_dim": 192,
    "depth": 12,
    "num_heads": 3,
    "init_values": 1e-5,
}
STUDENT_META = EncoderMeta(
    name="gpfm-student",
    family="gpfm",
    arch=STUDENT_ARCH,
    embed_dim=192,
    input_px=224,
    patch_size=14,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bicubic",
    tile_px=512,
    tile_mpp=0.25,
    precision="fp32",
    license="see the checkpoint (distilled by napari-gpfm)",
    source="napari-gpfm (shipped in the package)",
    description="ViT-Ti/14 student distilled by napari-gpfm; ships with the package, runs on CPU",
    weights_required=True,
)


def student_weights_path() -> Path:
    """``$GPFM_STUDENT_WEIGHTS`` if set, else the file shipped in the package (may not exist)."""
    env = os.environ.get(STUDENT_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent / "weights" / "gpfm_student.safetensors"


def _shipped_meta() -> EncoderMeta | None:
    path = student_weights_path()
    if not path.is_file():
        return None
    from gpfm_core.encoders.local import read_checkpoint_spec

    try:
        spec = read_checkpoint_spec(path)
    except EncoderError:
        return None
    return spec.meta.replace(name="gpfm-student") if spec.meta is not None else None


def _status() -> str:
    return "available" if student_weights_path().is_file() else "needs weights (not shipped yet)"


@register_encoder("gpfm-student", meta=STUDENT_META, meta_loader=_shipped_meta)
def build_student(
    *, pretrained: bool = True, weights: Path | None = None, seed: int = 0, **kw: Any
) -> Encoder:
    """Load the shipped student (or ``weights``); ``pretrained=False`` gives the random ViT-Ti/14."""
    from gpfm_core.encoders._base import build_timm_encoder
    from gpfm_core.encoders.local import build_local

    path = Path(weights) if weights is not None else student_weights_path() if pretrained else None
    if path is None:
        return build_timm_encoder(
            STUDENT_META,
            arch=STUDENT_ARCH,
            model_kwargs={**STUDENT_KWARGS, **kw},
            pretrained=False,
            weights=None,
            seed=seed,
        )
    if not path.is_file():
        raise EncoderError(
            f"the gpfm-student weights {path} are missing: reinstall napari-gpfm, set {STUDENT_ENV}=PATH, "
            "or pick another encoder (e.g. 'gpfm' with GPFM_WEIGHTS, or 'tiny-vit' for tests)"
        )
    return build_local(path=path, pretrained=True, name="gpfm-student", seed=seed, **kw)


build_student.weights_status = _status  # type: ignore[attr-defined]
