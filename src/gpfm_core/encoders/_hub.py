"""Where weights come from: a local path, an environment variable, or the Hugging Face Hub.

Order of resolution for :func:`resolve_weights`:

1. ``weights=`` given -> that file (it must exist);
2. the encoder's environment variable (``GPFM_WEIGHTS`` for ``gpfm``, ``GPFM_<NAME>_WEIGHTS``
   for the others, e.g. ``GPFM_UNI_WEIGHTS``) -> that file (it must exist);
3. the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), without network;
4. ``huggingface_hub.hf_hub_download`` — only when ``HF_HUB_OFFLINE`` is not set.

Otherwise an :class:`EncoderError` says how to provide the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    from gpfm_core.encoders._meta import EncoderMeta

__all__ = ["find_local_weights", "hf_offline", "resolve_weights", "weights_env_var"]

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def weights_env_var(name: str) -> str:
    """Environment variable that may point to the weights of encoder ``name``.

    ``"gpfm"`` -> ``GPFM_WEIGHTS``; ``"uni"`` -> ``GPFM_UNI_WEIGHTS``;
    ``"gpfm-student"`` -> ``GPFM_STUDENT_WEIGHTS``.
    """
    if name == "gpfm":
        return "GPFM_WEIGHTS"
    stem = name.upper().replace("-", "_").replace(":", "_").replace(".", "_")
    stem = stem[len("GPFM_") :] if stem.startswith("GPFM_") else stem
    return f"GPFM_{stem}_WEIGHTS"


def hf_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hf_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's default


def _existing(path: str | os.PathLike[str], *, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        hint = "it is a folder, pass the weights file inside it" if p.is_dir() else "check the path"
        raise EncoderError(f"{what} {p} is not an existing file: {hint}")
    return p


def _from_cache(meta: EncoderMeta) -> Path | None:
    if not (meta.hf_repo and meta.hf_filename):
        return None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(meta.hf_repo, meta.hf_filename, cache_dir=_hf_cache_dir())
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def find_local_weights(meta: EncoderMeta) -> Path | None:
    """The weights file of ``meta`` if it is available without network, else None.

    Looks at the encoder's environment variable and the Hugging Face cache. A variable pointing
    to a missing file raises :class:`EncoderError` (a typo should not silently fall back).
    """
    env = weights_env_var(meta.name)
    if os.environ.get(env):
        return _existing(os.environ[env], what=f"{env}=")
    return _from_cache(meta)


def resolve_weights(meta: EncoderMeta, weights: str | os.PathLike[str] | None = None) -> Path:
    """Path of the weights file for ``meta`` (see the module docstring for the order).

    Raises
    ------
    EncoderError
        The file cannot be found locally and cannot (or may not) be downloaded.
    """
    if weights is not None:
        return _existing(weights, what="weights file")
    local = find_local_weights(meta)
    if local is not None:
        return local
    env = weights_env_var(meta.name)
    if not (meta.hf_repo and meta.hf_filename):
        raise EncoderError(
            f"encoder {meta.name!r} needs a weights file: pass weights=PATH (CLI --weights) or set {env}"
        )
    where = f"{meta.hf_repo}/{meta.hf_filename}"
    if hf_offline():
        raise EncoderError(
            f"HF_HUB_OFFLINE is set and {where} is not in the Hugging Face cache: pass weights=PATH "
            f"(CLI --weights), set {env}=PATH, or unset HF_HUB_OFFLINE to download it"
        )
    from huggingface_hub import hf_hub_download

    log.info("downloading %s from the Hugging Face Hub", where)
    try:
        return Path(hf_hub_download(meta.hf_repo, meta.hf_filename, cache_dir=_hf_cache_dir()))
    except Exception as exc:  # network, gated repo, missing file: one clear line
        kind = type(exc).__name__
        gated = "Gated" in kind or "401" in str(exc) or "403" in str(exc)
        hint = (
            f"accept the licence at https://huggingface.co/{meta.hf_repo} and run `hf auth login`, or "
            if gated
            else ""
        )
        raise EncoderError(
            f"cannot download {where} ({kind}): {hint}pass weights=PATH (CLI --weights) or set {env}=PATH"
        ) from exc
