"""Safe checkpoint reading, key unwrapping and strict loading.

Checkpoints are untrusted input. ``.safetensors`` files hold tensors only and are preferred;
pickle-based files (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) are read with
``torch.load(weights_only=True)``, which refuses any Python object other than tensors and
plain containers, so a crafted file cannot run code. Nothing here ever calls ``pickle.load``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core._atomic import atomic_path
from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    import torch

    from gpfm_core.encoders._meta import EncoderMeta

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "convert_dinov2_chunks",
    "file_sha256",
    "load_checkpoint_file",
    "load_state_dict_strict",
    "locate_state_dict",
    "read_checkpoint",
    "read_safetensors_metadata",
    "save_encoder_safetensors",
    "unwrap_state_dict",
]

log = logging.getLogger(__name__)

#: ``.pth.tar`` is what timm's ``train.py`` writes (``model_best.pth.tar``).
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
#: Wrapper keys tried in order when a checkpoint is a dict of dicts. ``teacher`` comes first:
#: in DINOv2-style training (GPFM included) the EMA teacher is the published model. EMA copies
#: (timm's ``train.py`` saves ``state_dict_ema`` beside ``state_dict``) come before the raw model.
WRAPPER_KEYS = (
    "teacher",
    "state_dict_ema",
    "model_ema",
    "ema",
    "model",
    "state_dict",
    "model_state_dict",
    "student",
    "module",
)
#: Wrapper keys that hold an exponential moving average of the weights.
EMA_KEYS = frozenset({"state_dict_ema", "model_ema", "ema"})
#: Top-level names of model copies kept side by side in ONE flat state dict (DINOv2's
#: ``SSLMetaArch``: ``teacher.*`` and ``student.*``; an EMA beside the model), preferred first.
COPY_NAMESPACES = ("teacher", "model_ema", "ema_model", "ema", "student")
#: Wrapper prefixes stripped when most keys carry them (DDP and ``AveragedModel``
#: ``module.``, torch.compile ``_orig_mod.``, Lightning ``model.``, encoder wrappers); the few
#: keys outside are the wrapper's bookkeeping (``n_averaged``, loss buffers) and are dropped.
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.backbone.")
#: Heads of self-supervised training that are not part of the feature extractor.
DROP_PREFIXES = ("dino_head.", "ibot_head.", "head.", "heads.", "fc.", "classifier.")
_MAX_LISTED = 6


def file_sha256(path: str | os.PathLike[str], *, length: int = 16) -> str:
    """Hex sha256 prefix of a file (cached per path, size and mtime).

    Parameters
    ----------
    path : path-like
        File to hash.
    length : int
        Number of hex digits kept (16 = 64 bits).
    """
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)[:length]


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise EncoderError(f"checkpoint {path} does not exist: check the path")
    if path.is_dir():
        raise EncoderError(f"checkpoint {path} is a folder: pass the weights file inside it")
    if path.stat().st_size == 0:
        raise EncoderError(f"checkpoint {path} is empty (0 bytes): download it again")


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors file (no tensor is read)."""
    from safetensors import safe_open

    p = Path(path)
    _check_file(p)
    try:
        with safe_open(str(p), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise EncoderError(
            f"{p} is not a valid safetensors file ({exc}): download it again"
        ) from exc


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict, safely, on CPU.

    :func:`read_checkpoint` without the origin.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint file safely, on CPU: its state dict and where in the file it was.

    ``.safetensors`` is read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which also admits ``argparse.Namespace`` (timm's
    ``train.py`` stores its arguments that way; a namespace holds plain values and runs no
    code). Wrappers and prefixes are removed with :func:`locate_state_dict`.

    Returns
    -------
    state_dict : dict of str to Tensor
        Flat ``{name: tensor}``.
    origin : str
        Where the weights were found (``"state_dict_ema"``, ``"model > teacher.backbone"``,
        ``""`` for a bare state dict); see :func:`locate_state_dict`.

    Raises
    ------
    EncoderError
        Missing/empty/corrupt file, or a pickle holding non-tensor Python objects.
    """
    import argparse

    import torch

    p = Path(path)
    _check_file(p)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(p), device="cpu")
        except Exception as exc:
            raise EncoderError(
                f"{p} is not a valid safetensors file ({exc}): download it again"
            ) from exc
    else:
        import pickle

        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(
                    str(p), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p)
                )
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(
                f"{p} holds Python objects besides tensors and was NOT unpickled (loading it could "
                f"run code; {first[:160]}): use a .safetensors file or a plain state dict"
            ) from exc
        except Exception as exc:
            raise EncoderError(
                f"cannot read checkpoint {p} ({type(exc).__name__}: {str(exc)[:160]}): "
                "download it again or convert it to .safetensors"
            ) from exc
    return locate_state_dict(raw, source=str(p))


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _has_tensor(obj: Any, depth: int = 3) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0 or not isinstance(obj, Mapping):
        return False
    return any(_has_tensor(v, depth - 1) for v in obj.values())


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def locate_state_dict(
    obj: Any, *, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """Find the feature-extractor state dict inside a checkpoint object, and say where it was.

    The rules follow how checkpoints are saved in the field:

    - nested wrappers are descended in :data:`WRAPPER_KEYS` order: a distillation ``teacher``
      first (DINOv2 and GPFM publish the EMA teacher), then EMA copies (timm's
      ``state_dict_ema``, ``model_ema``), then ``model`` / ``state_dict`` / ``student`` ...;
    - a flat dict with several model copies side by side (DINOv2's ``SSLMetaArch``:
      ``teacher.*`` and ``student.*``; an EMA beside the model) keeps the preferred copy
      (:data:`COPY_NAMESPACES` order) and drops the rest (loss centres, the other copy);
    - ``backbone.*`` is kept when present (the heads around it are training-only);
    - a wrapper prefix (:data:`STRIP_PREFIXES`: DDP ``module.``, ``torch.compile``'s
      ``_orig_mod.``, Lightning's ``model.`` ...) carried by most keys is stripped, and the few
      keys outside it are the wrapper's own bookkeeping (``AveragedModel.n_averaged``, loss
      buffers of a LightningModule) and are dropped.

    Every choice among alternatives is logged at INFO, so a user sees which weights were used.

    Parameters
    ----------
    obj : object
        What ``torch.load`` / ``safetensors`` returned.
    source : str
        Name used in messages (the file path).

    Returns
    -------
    state_dict : dict of str to Tensor
        The unwrapped state dict.
    origin : str
        Where the weights came from, e.g. ``"state_dict_ema"`` or ``"model > teacher.backbone"``
        (``""`` for a bare state dict used as it is).

    Raises
    ------
    EncoderError
        The object holds no tensors, or is not a mapping.
    """
    import torch

    path: list[str] = []
    seen = 0
    while isinstance(obj, Mapping) and not _is_state_dict(obj) and seen < 8:
        seen += 1
        # a wrapper without tensors (``"model": {"name": ...}`` config) is not the weights
        present = [
            k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _has_tensor(obj[k])
        ]
        if not present:
            break
        key = present[0]
        if key in EMA_KEYS or len(present) > 1:
            what = "EMA weights" if key in EMA_KEYS else "weights"
            others = f" (also there: {', '.join(present[1:])})" if len(present) > 1 else ""
            log.info("%s: using the %s under %r%s", source, what, key, others)
        path.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise EncoderError(
            f"{source} holds a {type(obj).__name__}, not a state dict: save model.state_dict()"
        )
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise EncoderError(
            f"{source} holds no tensors under {sorted(map(str, obj))[:_MAX_LISTED]}: "
            "pass a checkpoint with a model state dict"
        )
    flat: list[str] = []
    for _ in range(8):
        tops = {_top(k) for k in sd if "." in k}
        copies = [c for c in COPY_NAMESPACES if c in tops]
        if copies:
            keep = copies[0]
            prefix = f"{keep}."
        elif "backbone" in tops:
            keep, prefix = "backbone", "backbone."
        else:
            keep = ""
            prefix = next(
                (p for p in STRIP_PREFIXES if 2 * sum(k.startswith(p) for k in sd) > len(sd)),
                "",
            )
        if not prefix:
            break
        dropped = sorted({_top(k) for k in sd if not k.startswith(prefix)})
        if dropped:
            # heads around a backbone are routine; another copy or bookkeeping is worth a line
            level = logging.DEBUG if keep == "backbone" else logging.INFO
            log.log(level, "%s: using %s*, dropping %s", source, prefix, _short(dropped))
        flat.append(prefix.rstrip("."))
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if flat:
        path.append(".".join(flat))
    return sd, " > ".join(path)


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The feature-extractor state dict inside a checkpoint object (see :func:`locate_state_dict`)."""
    return locate_state_dict(obj, source=source)[0]


def drop_keys(
    sd: dict[str, torch.Tensor],
    *,
    prefixes: Iterable[str] = DROP_PREFIXES,
    exact: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Copy of ``sd`` without keys starting with ``prefixes`` or equal to ``exact``."""
    prefixes, exact = tuple(prefixes), set(exact)
    return {k: v for k, v in sd.items() if k not in exact and not k.startswith(prefixes)}


_CHUNK_RE = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def convert_dinov2_chunks(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten DINOv2 ``BlockChunk`` keys: ``blocks.<chunk>.<i>.*`` -> ``blocks.<i>.*``.

    DINOv2 builds chunk ``c`` as ``[nn.Identity()] * start + blocks[start:start + size]``, so the
    index inside a chunk is already the GLOBAL block index (chunk 1 of 4x6 holds
    ``blocks.1.6`` .. ``blocks.1.11``). Plain ``blocks.<i>.*`` dicts pass through unchanged.
    """
    if not any(_CHUNK_RE.match(k) for k in sd):
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    chunk_of: dict[int, int] = {}
    for key, value in sd.items():
        m = _CHUNK_RE.match(key)
        if m is None:
            out[key] = value
            continue
        chunk, idx, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if chunk_of.setdefault(idx, chunk) != chunk:
            raise EncoderError(
                f"block {idx} appears in chunks {chunk_of[idx]} and {chunk}: corrupt DINOv2 checkpoint"
            )
        out[f"blocks.{idx}.{rest}"] = value
    order = sorted(chunk_of)
    if any(chunk_of[a] > chunk_of[b] for a, b in itertools.pairwise(order)):
        raise EncoderError("DINOv2 block chunks are out of order: corrupt checkpoint")
    return out


def _short(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return f"{shown} (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else shown


def load_state_dict_strict(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    source: str,
    assign: bool = False,
    ignore_prefixes: tuple[str, ...] = DROP_PREFIXES,
) -> None:
    """Load ``sd`` into ``model`` strictly, with one clear error on any mismatch.

    Floating tensors are cast to each parameter's dtype. ``assign=True`` adopts the tensors
    (used when the model was built on the ``meta`` device). Keys the model lacks that start with
    ``ignore_prefixes`` (classifier / self-supervised heads: the encoder is ``num_classes=0``)
    are dropped with a log line; every other difference is an error.

    Raises
    ------
    EncoderError
        Naming missing keys, unexpected keys and shape mismatches (lists truncated).
    """
    target = model.state_dict()
    heads = [k for k in sd if k not in target and k.startswith(ignore_prefixes)]
    if heads:
        log.info("%s: ignoring %d head tensor(s) (%s)", source, len(heads), _short(heads))
        sd = {k: v for k, v in sd.items() if k not in set(heads)}
    missing = set(target) - set(sd)
    unexpected = set(sd) - set(target)
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(sd) & set(target))
        if tuple(sd[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_short(unexpected)}")
        if shapes:
            more = f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""
            parts.append(f"shape mismatch: {'; '.join(shapes[:3])}{more}")
        raise EncoderError(
            f"weights in {source} do not fit this architecture — {' | '.join(parts)}: "
            "pass the checkpoint of this encoder (or the matching encoder name)"
        )
    cast = {}
    for k, v in sd.items():
        ref = target[k]
        cast[k] = v.to(ref.dtype) if v.is_floating_point() and v.dtype != ref.dtype else v
    model.load_state_dict(cast, strict=True, assign=assign)


def save_encoder_safetensors(
    encoder_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    meta: EncoderMeta | None = None,
) -> Path:
    """Write an encoder checkpoint that ``create_encoder(path)`` loads with no extra arguments.

    The file is a safetensors state dict of the timm model (``encoder.model``) with
    ``__metadata__`` keys ``gpfm.format`` ("1"), ``gpfm.arch`` (timm model name),
    ``gpfm.kwargs`` (JSON of ``timm.create_model`` keyword arguments) and ``gpfm.meta``
    (JSON of :class:`EncoderMeta`). Written atomically (temporary file + ``os.replace``).

    Parameters
    ----------
    encoder_or_state_dict : Encoder, nn.Module or mapping of str to Tensor
        An ``Encoder`` (its ``arch``, ``model_kwargs`` and ``meta`` are the defaults), a timm
        model, or its state dict.
    path : path-like
        Destination; must end with ``.safetensors``.
    arch, kwargs, meta
        Override/provide the metadata. ``arch`` is required unless an ``Encoder`` is given.
    """
    import torch
    from safetensors.torch import save_file

    dest = Path(path)
    if dest.suffix != ".safetensors":
        raise EncoderError(
            f"{dest}: encoder checkpoints are written as .safetensors, rename the file"
        )
    obj = encoder_or_state_dict
    arch = arch or getattr(obj, "arch", None)
    kwargs = dict(kwargs if kwargs is not None else getattr(obj, "model_kwargs", None) or {})
    meta = meta or getattr(obj, "meta", None)
    if isinstance(obj, torch.nn.Module):
        obj = (
            obj.model.state_dict()
            if hasattr(obj, "meta") and hasattr(obj, "model")
            else obj.state_dict()
        )
    if not arch:
        raise EncoderError(
            "save_encoder_safetensors needs arch= (the timm model name) for a bare state dict"
        )
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True)
    except TypeError as exc:
        raise EncoderError(
            f"model kwargs must be JSON-serialisable to be embedded ({exc})"
        ) from exc
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in obj.items()}
    metadata = {"gpfm.format": "1", "gpfm.arch": arch, "gpfm.kwargs": kwargs_json}
    if meta is not None:
        metadata["gpfm.meta"] = meta.to_json()
    # atomic_path gives the finished file the usual umask mode (safetensors writes 0600)
    with atomic_path(dest, parents=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("wrote encoder checkpoint %s (%s, %d tensors)", dest, arch, len(tensors))
    return dest
