"""``create_encoder``: one entry for registered names, ``timm:<model>`` specs and checkpoint files."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.encoders._checkpoint import CHECKPOINT_SUFFIXES
from gpfm_core.encoders._meta import EncoderMeta
from gpfm_core.encoders._registry import _entry, is_registered
from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    import torch

    from gpfm_core.encoders._base import Encoder

__all__ = [
    "create_encoder",
    "default_encoder_name",
    "looks_like_path",
    "resolve_device",
    "weights_status",
]

log = logging.getLogger(__name__)

#: Overrides that change the meta (default tiling, precision) rather than the architecture.
META_OVERRIDES = ("tile_px", "tile_mpp", "precision")


def looks_like_path(spec: str | os.PathLike[str]) -> bool:
    """True for an existing path or a string ending with a checkpoint suffix / containing a separator."""
    if isinstance(spec, os.PathLike):
        return True
    return (
        spec.lower().endswith(CHECKPOINT_SUFFIXES)
        or os.sep in spec
        or "/" in spec
        or Path(spec).exists()
    )


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA if available, else MPS, else CPU; otherwise ``torch.device(device)``."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EncoderError(
            f"invalid device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(
            f"device {device!r} requested but CUDA is not available: use device='cpu' or 'auto'"
        )
    return dev


def create_encoder(
    name_or_path: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = "cpu",
    **overrides: Any,
) -> Encoder:
    """Build an encoder in eval mode on ``device``.

    Parameters
    ----------
    name_or_path : str or path-like
        A registered name (see :func:`list_encoders`), ``"default"`` (see
        :func:`default_encoder_name`), ``"timm:<model>"`` (any timm model, ``num_classes=0``), or
        a checkpoint file (``.safetensors`` with embedded metadata, or with a JSON sidecar; a
        file named like a published checkpoint, e.g. ``GPFM.pth``, loads into that encoder).
    weights : path-like, optional
        Local weights file; always wins over environment variables and the Hub.
    pretrained : bool
        Load published weights (resolved locally first, see ``resolve_weights``). False gives a
        deterministic random initialisation (``weights_hash == "random-init-seed<seed>"``).
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"auto"``; ``"meta"`` builds a weight-less skeleton (for
        inspecting shapes / parameter counts without memory).
    **overrides
        ``tile_px`` / ``tile_mpp`` / ``precision`` change the meta (default tiling); ``seed``
        sets the random init; anything else goes to the builder (e.g. ``depth=4`` for timm).

    Returns
    -------
    Encoder
        ``torch.nn.Module``; ``enc(x)`` maps ``(B, 3, input_px, input_px)`` to ``(B, embed_dim)``.
    """
    import torch

    meta_changes = {k: overrides.pop(k) for k in META_OVERRIDES if k in overrides}
    spec = os.fspath(name_or_path)
    if spec == "default":
        spec = default_encoder_name()
    dev = torch.device("meta") if str(device) == "meta" else resolve_device(device)
    if dev.type == "meta" and weights is not None:
        raise EncoderError(
            "device='meta' builds a weight-less skeleton: drop weights= or pick a real device"
        )
    w = Path(weights).expanduser() if weights is not None else None
    load = pretrained and dev.type != "meta"

    if is_registered(spec):
        builder = _entry(spec).builder
    elif spec.startswith("timm:"):
        from gpfm_core.encoders.timm_any import build_timm_any as builder

        overrides["timm_name"] = spec[len("timm:") :]
    elif looks_like_path(spec):
        path = Path(spec).expanduser()
        alias = _published_alias(path)
        if alias is not None:  # e.g. ~/models/GPFM.pth -> create_encoder("gpfm", weights=...)
            builder = _entry(alias).builder
            w = w if w is not None else path
        else:
            from gpfm_core.encoders.local import build_local as builder

            overrides["path"] = path
    else:
        _entry(spec)  # raises: unknown name, listing the known ones
        raise AssertionError("unreachable")

    if dev.type == "meta":
        with torch.device("meta"):
            enc = builder(pretrained=False, weights=None, **overrides)
    else:
        enc = builder(pretrained=load, weights=w, **overrides)
    if meta_changes:
        enc.meta = enc.meta.replace(**meta_changes)
    enc.eval()
    if dev.type != "meta":
        enc.to(dev)
    log.debug("created encoder %s (%s) on %s", enc.meta.name, enc.weights_hash, dev)
    return enc


def _published_alias(path: Path) -> str | None:
    """Registered name whose published file name is ``path.name`` (unique match) when the file
    does not describe itself (no ``gpfm.arch`` metadata / sidecar); else None."""
    from gpfm_core.encoders._registry import list_encoders
    from gpfm_core.encoders.local import read_checkpoint_spec

    names = [m.name for m in list_encoders() if m.hf_filename and m.hf_filename == path.name]
    if len(names) != 1 or not path.is_file():
        return None
    try:
        read_checkpoint_spec(path)
    except EncoderError:
        return names[0]
    return None


def weights_status(meta: EncoderMeta) -> str:
    """``"available"``, ``"needs weights"``, ``"random-init"``, ``"no weights"`` (handcrafted)
    or ``"needs package <x>"`` (no network)."""
    if meta.family == "handcrafted":
        return "no weights"
    if not meta.weights_required:
        return "random-init"
    entry = _entry(meta.name) if is_registered(meta.name) else None
    status = getattr(entry.builder, "weights_status", None) if entry else None
    if status is not None:
        return str(status())
    from gpfm_core.encoders._hub import find_local_weights

    try:
        return "available" if find_local_weights(meta) is not None else "needs weights"
    except EncoderError:
        return "needs weights (env path missing)"


def default_encoder_name() -> str:
    """The encoder used when none is named.

    ``"gpfm"`` when its weights resolve locally without network (``GPFM_WEIGHTS`` or the Hugging
    Face cache), else ``"gpfm-student"`` when its shipped weights file exists, else
    ``"tiny-vit"`` (random weights, features meaningless) with a warning.
    """
    from gpfm_core.encoders._hub import find_local_weights
    from gpfm_core.encoders._registry import get_encoder_meta
    from gpfm_core.encoders.student import student_weights_path

    try:
        if find_local_weights(get_encoder_meta("gpfm")) is not None:
            return "gpfm"
    except EncoderError as exc:
        warnings.warn(f"ignoring GPFM weights: {exc}", stacklevel=2)
    if student_weights_path().is_file():
        return "gpfm-student"
    warnings.warn(
        "no GPFM weights (set GPFM_WEIGHTS=/path/GPFM.pth) and no shipped student: using 'tiny-vit', "
        "whose random features are for testing only",
        stacklevel=2,
    )
    return "tiny-vit"
