"""Shared input checks and atomic writes for :mod:`gpfm_core.analysis` (numpy only)."""

from __future__ import annotations

import numpy as np

from gpfm_core.errors import GpfmError


def as_features(features: object, *, name: str = "features", finite: bool = True) -> np.ndarray:
    """Return ``features`` as a 2-D float32 array, or raise :class:`GpfmError`.

    Parameters
    ----------
    features
        Array-like of shape (N, D).
    name
        Name used in the error message.
    finite
        Reject NaN / inf values.

    Returns
    -------
    numpy.ndarray
        (N, D) float32 (no copy when already float32).
    """
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise GpfmError(
            f"{name} must be a 2-D (N, D) array, got shape {arr.shape}: pass one row per tile"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise GpfmError(f"{name} is empty (shape {arr.shape}): embed the slide first")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise GpfmError(f"{name} must be numeric, got dtype {arr.dtype}: pass the embedding array")
    arr = arr.astype(np.float32, copy=False)
    if finite and not np.isfinite(arr).all():
        raise GpfmError(f"{name} contains NaN or inf: re-embed the slide or drop those tiles")
    return arr


def as_points(points: object, *, name: str, n: int | None = None) -> np.ndarray:
    """Return an (N, 2) int64 array (coords / grid_rc), or raise :class:`GpfmError`."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise GpfmError(
            f"{name} must be an (N, 2) array, got shape {arr.shape}: pass one (x, y) or (row, col) per tile"
        )
    if n is not None and arr.shape[0] != n:
        raise GpfmError(
            f"{name} has {arr.shape[0]} rows but there are {n} tiles: pass arrays from the same slide"
        )
    if not np.issubdtype(arr.dtype, np.integer) and (
        not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))
    ):
        raise GpfmError(f"{name} must hold whole numbers: pass the int64 array from the tile grid")
    return arr.astype(np.int64, copy=False)


def positive_int(value: object, *, name: str) -> int:
    """Return ``value`` as a positive int, or raise :class:`GpfmError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise GpfmError(f"{name} must be a positive integer, got {value!r}")
    return int(value)




def size_xy(value: object, *, name: str) -> tuple[int, int]:
    """A tile size or stride as ``(x, y)`` positive ints: one int for both axes, or a pair.

    Non-square pixels give tiles whose level-0 width and height differ
    (:attr:`gpfm_core.tiling.TileGrid.tile_size_level0_xy`); square ones may pass one int.
    """
    if isinstance(value, (tuple, list, np.ndarray)):
        arr = list(np.asarray(value).ravel())
        if len(arr) != 2:
            raise GpfmError(f"{name} must be one positive integer or an (x, y) pair, got {value!r}")
        return positive_int(arr[0], name=f"{name} x"), positive_int(arr[1], name=f"{name} y")
    v = positive_int(value, name=name)
    return v, v
