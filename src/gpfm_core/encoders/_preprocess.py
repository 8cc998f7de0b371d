"""Tiles (uint8 RGB) -> normalised network input, driven by :class:`EncoderMeta`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpfm_core.errors import EncoderError

if TYPE_CHECKING:
    import torch

    from gpfm_core.encoders._meta import EncoderMeta

__all__ = ["preprocess"]


def preprocess(tiles: Any, meta: EncoderMeta, *, device: Any = None) -> torch.Tensor:
    """Resize, scale and normalise a batch of RGB tiles for an encoder.

    Mirrors the published pipelines (PIL resize -> ``ToTensor`` -> ``Normalize``): tiles are
    resized to ``(meta.input_px, meta.input_px)`` with ``meta.interpolation`` (antialiased),
    clamped and rounded to the 0..255 grid like PIL's uint8 output, divided by 255 and
    normalised with ``meta.mean`` / ``meta.std``. Tiles already at ``input_px`` are not resized.

    Parameters
    ----------
    tiles : numpy.ndarray or torch.Tensor
        ``(B, H, W, 3)`` uint8 RGB (a single ``(H, W, 3)`` tile is accepted too).
    meta : EncoderMeta
        Supplies ``input_px``, ``interpolation``, ``mean`` and ``std``.
    device : str or torch.device, optional
        Where the work happens and the result lives (default: the input's device / CPU).
        Resizing on the accelerator is much faster for large batches.

    Returns
    -------
    torch.Tensor
        ``(B, 3, input_px, input_px)`` float32, contiguous.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    if isinstance(tiles, np.ndarray):
        if tiles.dtype != np.uint8:
            raise EncoderError(
                f"tiles must be uint8 RGB, got numpy {tiles.dtype}: convert with .astype(np.uint8)"
            )
        x = torch.from_numpy(np.ascontiguousarray(tiles))
    elif isinstance(tiles, torch.Tensor):
        if tiles.dtype != torch.uint8:
            raise EncoderError(
                f"tiles must be uint8 RGB, got torch {tiles.dtype}: convert with .to(torch.uint8)"
            )
        x = tiles
    else:
        raise EncoderError(
            f"tiles must be a numpy array or torch tensor, got {type(tiles).__name__}"
        )
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise EncoderError(
            f"tiles must have shape (B, H, W, 3) RGB, got {tuple(x.shape)}: drop alpha / move channels last"
        )
    if x.shape[0] == 0:
        raise EncoderError("tiles is an empty batch (B=0): pass at least one tile")
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    size = meta.input_px
    if x.shape[-2:] != (size, size):
        mode = meta.interpolation
        kwargs = (
            {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
        )
        x = F.interpolate(x, size=(size, size), mode=mode, **kwargs)
        x = x.clamp_(0.0, 255.0).round_()
    mean = torch.tensor(meta.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(meta.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    return ((x - mean) / std).contiguous()
