"""timm-style encoder registry: ``name -> (builder, EncoderMeta)``. Imports no torch.

Builders have the signature ``builder(*, pretrained: bool, weights: Path | None, **kw) -> Encoder``
and are registered with :func:`register_encoder`. Built-in entries live in ``gpfm.py``,
``experts.py``, ``handcrafted.py``, ``tiny.py`` and ``student.py``; those modules import torch only inside
their builders, so listing encoders stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    from gpfm_core.encoders._base import Encoder
    from gpfm_core.encoders._meta import EncoderMeta

__all__ = ["get_encoder_meta", "is_registered", "list_encoders", "register_encoder"]

Builder = Callable[..., "Encoder"]

_BUILTIN_MODULES = (
    "gpfm_core.encoders.gpfm",
    "gpfm_core.encoders.student",
    "gpfm_core.encoders.experts",
    "gpfm_core.encoders.handcrafted",
    "gpfm_core.encoders.tiny",
)


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    meta: EncoderMeta
    meta_loader: Callable[[], EncoderMeta | None] | None = None

    def current_meta(self) -> EncoderMeta:
        if self.meta_loader is not None:
            loaded = self.meta_loader()
            if loaded is not None:
                return loaded
        return self.meta


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register_encoder(
    name: str, *, meta: EncoderMeta, meta_loader: Callable[[], EncoderMeta | None] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name``.

    Parameters
    ----------
    name : str
        Registry name; must equal ``meta.name`` and not contain ``:`` or a path separator.
    meta : EncoderMeta
        Static description shown by ``list_encoders`` / ``gpfm encoders``.
    meta_loader : callable, optional
        Returns a fresher meta when available (e.g. read from a shipped checkpoint header).
    """
    if name != meta.name:
        raise ValueError(f"register_encoder({name!r}): meta.name is {meta.name!r}")
    if ":" in name or "/" in name or "\\" in name:
        raise ValueError(f"encoder name {name!r} may not contain ':' or path separators")

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = _Entry(builder, meta, meta_loader)
        return builder

    return deco


def _ensure_builtin() -> None:
    global _loaded
    if not _loaded:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
        _loaded = True


def is_registered(name: str) -> bool:
    """True when ``name`` is a registered encoder name."""
    _ensure_builtin()
    return name in _REGISTRY


def registered_names() -> list[str]:
    """Registered names: built-ins in a fixed order (GPFM first), then others as registered."""
    _ensure_builtin()
    rank = {mod: i for i, mod in enumerate(_BUILTIN_MODULES)}
    names = list(_REGISTRY)
    return sorted(
        names, key=lambda n: (rank.get(_REGISTRY[n].builder.__module__, len(rank)), names.index(n))
    )


def _entry(name: str) -> _Entry:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EncoderError(
            f"unknown encoder {name!r}: known are {', '.join(registered_names())}; "
            "'timm:<model>' and a checkpoint path (.safetensors/.pth/.pt/.bin) also work"
        ) from None


def get_builder(name: str) -> Builder:
    """The builder registered under ``name`` (EncoderError listing known names otherwise)."""
    return _entry(name).builder


def get_encoder_meta(name: str) -> EncoderMeta:
    """The :class:`EncoderMeta` of a registered name, a ``"timm:<model>"`` spec or a checkpoint path.

    ``timm:`` specs and paths build the model on the ``meta`` device (no weights are read).
    """
    _ensure_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name].current_meta()
    from gpfm_core.encoders._factory import _published_alias, create_encoder, looks_like_path

    if looks_like_path(name) and not name.startswith("timm:"):
        from pathlib import Path

        from gpfm_core.encoders.local import read_checkpoint_spec

        alias = _published_alias(Path(name).expanduser())
        if alias is not None:
            return _REGISTRY[alias].current_meta()

        spec = read_checkpoint_spec(name)
        if spec.meta is not None:
            return spec.meta
    if name.startswith("timm:") or looks_like_path(name):
        return create_encoder(name, pretrained=False, device="meta").meta
    return _entry(name).meta  # raises the listing error


def list_encoders() -> list[EncoderMeta]:
    """Metas of every registered encoder (built-ins first, GPFM first)."""
    return [_REGISTRY[name].current_meta() for name in registered_names()]


def registry_snapshot() -> dict[str, Any]:
    """Copy of the registry (for tests that register temporary encoders)."""
    return dict(_REGISTRY)


def restore_registry(snapshot: dict[str, Any]) -> None:
    """Restore a copy made by :func:`registry_snapshot`."""
    _REGISTRY.clear()
    _REGISTRY.update(snapshot)
