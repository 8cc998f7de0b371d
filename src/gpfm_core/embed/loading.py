"""Reading embeddings files: :func:`load_embeddings`, :func:`find_embeddings`.

Reads files written by :class:`~gpfm_core.embed.storage.EmbeddingWriter` and, for
``features`` / ``coords`` and their attributes, files written by TRIDENT or CLAM.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.embed.storage import _from_attr, embeddings_path
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)


class EmbeddingsFileError(GpfmError):
    """An embeddings file is missing, unreadable, or lacks ``features`` / ``coords``."""


@dataclass(frozen=True)
class Embeddings:
    """The contents of one embeddings file.

    Attributes
    ----------
    features : np.ndarray
        (N, D) float32 tile embeddings (float16 files are upcast).
    coords : np.ndarray
        (N, 2) int64 level-0 top-left ``(x, y)``.
    grid_rc : np.ndarray
        (N, 2) int64 ``(row, col)``; derived from ``coords`` and the stride for files
        written by TRIDENT / CLAM, which lack it.
    tissue_fraction : np.ndarray or None
        (N,) float32, or None when the file lacks it.
    attrs : dict
        Root attributes merged over ``coords`` and ``features`` attributes.
    path : Path
        The file read.
    """

    features: np.ndarray
    coords: np.ndarray
    grid_rc: np.ndarray
    tissue_fraction: np.ndarray | None
    attrs: dict[str, Any] = field(repr=False)
    path: Path

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def embed_dim(self) -> int:
        """D, the embedding width."""
        return int(self.features.shape[1])

    @property
    def encoder(self) -> str | None:
        """Name of the encoder that made the features, when recorded."""
        value = self.attrs.get("encoder")
        return None if value is None else str(value)


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Root attributes of an embeddings file, merged over ``coords`` / ``features`` attributes."""
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            attrs: dict[str, Any] = {}
            for name in ("features", "coords"):
                if name in f:
                    attrs.update({k: _from_attr(v) for k, v in f[name].attrs.items()})
            attrs.update({k: _from_attr(v) for k, v in f.attrs.items()})
    except FileNotFoundError:
        raise EmbeddingsFileError(
            f"{p} does not exist; embed the slide first (gpfm embed)"
        ) from None
    except OSError as exc:
        raise EmbeddingsFileError(
            f"{p} is not a readable HDF5 file ({exc}); embed the slide again"
        ) from None
    return attrs


def load_embeddings(path: str | os.PathLike[str]) -> Embeddings:
    """Load an embeddings file written by gpfm, TRIDENT or CLAM.

    Returns
    -------
    Embeddings
        ``features`` (N, D) float32, ``coords`` (N, 2) int64, ``grid_rc`` (N, 2) int64,
        ``tissue_fraction`` (N,) or None, merged ``attrs``.

    Raises
    ------
    EmbeddingsFileError
        Missing or unreadable file, or no ``features`` / ``coords`` datasets.
    """
    import h5py

    p = Path(path)
    attrs = read_attrs(p)
    with h5py.File(p, "r") as f:
        if "features" not in f or "coords" not in f:
            raise EmbeddingsFileError(
                f"{p} has no 'features' and 'coords' datasets; not an embeddings file"
            )
        features = np.asarray(f["features"][:], dtype=np.float32)
        coords = np.asarray(f["coords"][:], dtype=np.int64)
        grid_rc = np.asarray(f["grid_rc"][:], dtype=np.int64) if "grid_rc" in f else None
        tissue = (
            np.asarray(f["tissue_fraction"][:], dtype=np.float32)
            if "tissue_fraction" in f
            else None
        )
    if features.ndim == 3 and features.shape[0] == 1:  # some writers add a batch axis
        features = features[0]
    coords = coords.reshape(-1, 2)
    if features.shape[0] != coords.shape[0]:
        raise EmbeddingsFileError(
            f"{p}: {features.shape[0]} features but {coords.shape[0]} coords; file is corrupt"
        )
    if grid_rc is None:
        grid_rc = _grid_rc_from_coords(coords, attrs)
    return Embeddings(features, coords, grid_rc, tissue, attrs, p)


def _grid_rc_from_coords(coords: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """(row, col) of each tile from its level-0 corner, for files that lack ``grid_rc``."""
    stride = attrs.get("stride_level0")
    if stride is None:
        size0 = attrs.get("patch_size_level0")
        if size0 is None and coords.shape[0] > 1:
            steps = np.diff(np.unique(coords[:, 0]))
            size0 = int(steps.min()) if steps.size else 1
        size0 = int(size0 or 1)
        overlap = int(attrs.get("overlap", 0) or 0)
        patch = int(attrs.get("patch_size", 0) or 0)
        stride = size0 - (overlap * size0 // patch if patch else 0)
    stride = max(int(stride), 1)
    return (coords[:, ::-1] // stride).astype(np.int64)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | np.floating) or isinstance(b, float | np.floating):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(a, list | tuple | np.ndarray) or isinstance(b, list | tuple | np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return bool(a == b)


def matches(attrs: Mapping[str, Any], **params: Any) -> bool:
    """Whether stored ``attrs`` agree with every given (non-None) param (floats approximately)."""
    for key, want in params.items():
        if want is None:
            continue
        if key not in attrs or not _same(attrs[key], want):
            return False
    return True


def find_embeddings(
    slide_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    slide_id: str | None = None,
    **params: Any,
) -> Path | None:
    """Find the existing embeddings of a slide made with the given parameters.

    Parameters
    ----------
    slide_path
        The slide; its file must exist unless ``slide_id`` is given.
    out_dir
        Folder searched for ``<slide_stem>.h5``.
    slide_id
        The slide's content id; computed by opening the slide when None.
    **params
        Root attributes to agree with, e.g. ``encoder="tiny-vit"``, ``weights_hash=...``,
        ``requested_mpp=0.5``, ``tile_px=224``, ``overlap_px=0``, ``min_tissue=0.25``;
        None values are ignored.

    Returns
    -------
    Path or None
        The file when it exists, is complete, belongs to this slide and matches; else None.
    """
    path = embeddings_path(slide_path, out_dir)
    if not path.is_file():
        return None
    try:
        attrs = read_attrs(path)
    except EmbeddingsFileError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    if slide_id is None:
        from gpfm_core.slide import open_slide

        with open_slide(slide_path) as slide:
            slide_id = slide.info.slide_id
    if attrs.get("slide_id") != slide_id:
        log.info(
            "%s belongs to another slide (id %s, not %s)", path, attrs.get("slide_id"), slide_id
        )
        return None
    return path if matches(attrs, **params) else None
