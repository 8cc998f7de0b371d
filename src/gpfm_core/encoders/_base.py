"""The :class:`Encoder` module wrapper and the shared timm build-and-load path.

This module imports torch at import time; the package ``__init__`` only imports it lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpfm_core.encoders._checkpoint import file_sha256, load_state_dict_strict, read_checkpoint
from gpfm_core.encoders._hub import resolve_weights
from gpfm_core.encoders._meta import EncoderMeta
from gpfm_core.errors import EncoderError

__all__ = ["Encoder", "StateDictAdapter", "build_timm_encoder", "create_timm_model"]

log = logging.getLogger(__name__)

StateDictAdapter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class Encoder(nn.Module):
    """A feature extractor: ``(B, 3, input_px, input_px)`` normalised float -> ``(B, D)``.

    Attributes
    ----------
    model : nn.Module
        The underlying (timm) network.
    meta : EncoderMeta
        Static description; drives preprocessing and default tiling.
    weights_hash : str
        sha256 prefix of the weights file, or ``"random-init-seed<N>"``.
    arch : str
        timm model name (or a free description for non-timm models).
    model_kwargs : dict
        Keyword arguments given to ``timm.create_model`` (JSON-serialisable for timm models).
    weights_origin : str
        Where in the weights file the weights were found (``"state_dict_ema"``,
        ``"model > teacher.backbone"`` ...; ``""`` for a bare state dict or no file), see
        :func:`~gpfm_core.encoders.locate_state_dict`.
    """

    def __init__(
        self,
        model: nn.Module,
        meta: EncoderMeta,
        *,
        weights_hash: str,
        arch: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        weights_origin: str = "",
    ) -> None:
        super().__init__()
        self.model = model
        self.meta = meta
        self.weights_hash = weights_hash
        self.arch = arch or meta.arch
        self.model_kwargs = dict(model_kwargs or {})
        self.weights_origin = weights_origin

    @property
    def device(self) -> torch.device:
        """Device of the first parameter (CPU for parameter-free models)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise EncoderError(
                f"{self.meta.name}: input must be (B, 3, H, W), got {shape}: use preprocess()"
            )
        if not x.is_floating_point():
            raise EncoderError(
                f"{self.meta.name}: input must be float (normalised), got {x.dtype}: use preprocess()"
            )
        size = self.meta.input_px
        fixed = not getattr(self.model, "dynamic_img_size", True) and hasattr(
            self.model, "patch_embed"
        )
        if fixed and tuple(x.shape[-2:]) != (size, size):
            raise EncoderError(
                f"{self.meta.name}: input must be {size}x{size} px, got {x.shape[-2]}x{x.shape[-1]}: "
                "resize with preprocess(tiles, encoder.meta)"
            )

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Global feature and patch tokens.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, 3, H, W)`` normalised float.

        Returns
        -------
        dict
            ``"cls"``: ``(B, D)`` — the same tensor :meth:`forward` returns (for ViTs the CLS
            token after the final norm); ``"patch"``: ``(B, N, D)`` patch tokens after the final
            norm (prefix/register tokens removed), or None when the model has none.
        """
        self._check_input(x)
        feats = self.model.forward_features(x)
        cls = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 3:
            patch = feats[:, int(getattr(self.model, "num_prefix_tokens", 1)) :]
        elif feats.ndim == 4:  # CNN feature map (B, C, h, w) -> (B, h*w, C)
            patch = feats.flatten(2).transpose(1, 2)
        else:
            patch = None
        return {"cls": cls, "patch": patch}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised float -> ``(B, embed_dim)`` features."""
        self._check_input(x)
        return self.model(x)

    def extra_repr(self) -> str:
        return f"name={self.meta.name!r}, embed_dim={self.meta.embed_dim}, weights={self.weights_hash!r}"


def create_timm_model(arch: str, model_kwargs: Mapping[str, Any], *, seed: int = 0) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)``, seeded.

    The global RNG is left untouched (``torch.random.fork_rng``), so identical arguments always
    give identical random weights. Respects an active ``torch.device`` context (e.g. ``meta``).
    """
    import timm

    kwargs = {"num_classes": 0, **model_kwargs}
    if not timm.is_model(arch):
        raise EncoderError(f"timm has no model {arch!r}: see timm.list_models() for valid names")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as exc:
            raise EncoderError(f"cannot build {arch} with {sorted(kwargs)}: {exc}") from exc


def _random_hash(seed: int) -> str:
    return f"random-init-seed{seed}"


def _meta_from_model(meta: EncoderMeta, model: nn.Module) -> EncoderMeta:
    """Update dims that architecture overrides may change (embed_dim, input_px, patch_size)."""
    changes: dict[str, Any] = {}
    dim = int(getattr(model, "num_features", meta.embed_dim))
    if dim != meta.embed_dim:
        changes["embed_dim"] = dim
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        if int(pe.img_size[0]) != meta.input_px:
            changes["input_px"] = int(pe.img_size[0])
        if int(pe.patch_size[0]) != meta.patch_size:
            changes["patch_size"] = int(pe.patch_size[0])
    return meta.replace(**changes) if changes else meta


def build_timm_encoder(
    meta: EncoderMeta,
    *,
    arch: str,
    model_kwargs: Mapping[str, Any],
    pretrained: bool,
    weights: str | os.PathLike[str] | None,
    adapter: StateDictAdapter | None = None,
    seed: int = 0,
) -> Encoder:
    """Build a timm model and load its weights through the safe, strict path.

    Parameters
    ----------
    meta : EncoderMeta
        Registered meta; dims are updated from the built model.
    arch, model_kwargs
        ``timm.create_model`` name and keyword arguments (``num_classes=0`` is implied).
    pretrained : bool
        Resolve weights with :func:`resolve_weights` when ``weights`` is None.
    weights : path-like, optional
        Local weights file; always wins.
    adapter : callable, optional
        Maps the unwrapped checkpoint keys onto timm's names (e.g. DINOv2 chunk flattening).
    seed : int
        Seed of the random initialisation when no weights are loaded.
    """
    path: Path | None = None
    if weights is not None or pretrained:
        path = resolve_weights(meta, weights)
    if path is None:
        model = create_timm_model(arch, model_kwargs, seed=seed)
        return Encoder(
            model,
            _meta_from_model(meta, model),
            weights_hash=_random_hash(seed),
            arch=arch,
            model_kwargs=model_kwargs,
        )
    sd, origin = read_checkpoint(path)
    if adapter is not None:
        sd = adapter(sd)
    with torch.device("meta"):  # no wasted random init of large models
        model = create_timm_model(arch, model_kwargs, seed=seed)
    load_state_dict_strict(model, sd, source=str(path), assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = create_timm_model(arch, model_kwargs, seed=seed)  # non-persistent buffers
        load_state_dict_strict(model, sd, source=str(path))
    log.info("loaded %s weights from %s%s", meta.name, path, f" [{origin}]" if origin else "")
    return Encoder(
        model,
        _meta_from_model(meta, model),
        weights_hash=file_sha256(path),
        arch=arch,
        model_kwargs=model_kwargs,
        weights_origin=origin,
    )
