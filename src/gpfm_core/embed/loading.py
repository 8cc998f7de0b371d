"""Reading embeddings files: :func:`load_embeddings`, :func:`read_attrs`.

Reads files written by :class:`~gpfm_core.embed.storage.EmbeddingWriter` and, for
``features`` / ``coords`` and their attributes, files written by TRIDENT or CLAM; where the
tiles lie comes from the files' attributes (:mod:`gpfm_core.embed.geometry`).
Finding a slide's file: :mod:`gpfm_core.embed.layout`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.embed.geometry import TileGeometry, tile_geometry
from gpfm_core.embed.storage import _from_attr
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)


class EmbeddingsFileError(GpfmError):
    """An embeddings file is missing, unreadable, or lacks ``features`` / ``coords``."""


class GeometryWarning(UserWarning):
    """A foreign file's tile geometry was assumed, or cannot be known (one line says which)."""


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
        (N, 2) int64 ``(row, col)`` of each tile's cell in one raster of pitch
        ``geometry.stride_level0`` from ``geometry.origin``; derived from ``coords`` and the
        file's tiling attributes for TRIDENT / CLAM files, which lack it. Exact only when
        ``geometry.exact``; ``coords`` are always exact.
    tissue_fraction : np.ndarray or None
        (N,) float32, or None when the file lacks it.
    attrs : dict
        Root attributes merged over ``coords`` and ``features`` attributes (and those of the
        ``coords_file`` it was loaded with).
    path : Path
        The file read.
    geometry : TileGeometry
        Tile size, stride, raster origin and shape, from the attributes
        (:func:`gpfm_core.embed.geometry.tile_geometry`).
    ink_fraction : np.ndarray or None
        (N,) float32 fraction of each tile on marker ink or marking dye, or None when the
        file lacks it (files of other tools, older gpfm files).
    """

    features: np.ndarray
    coords: np.ndarray
    grid_rc: np.ndarray
    tissue_fraction: np.ndarray | None
    attrs: dict[str, Any] = field(repr=False)
    path: Path
    geometry: TileGeometry = field(repr=False, default=None)  # type: ignore[assignment]
    ink_fraction: np.ndarray | None = field(repr=False, default=None)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def embed_dim(self) -> int:
        """D, the embedding width."""
        return int(self.features.shape[1])

    @property
    def tile_size_level0(self) -> int | None:
        """Width of each tile's footprint in level-0 px (None when it cannot be known)."""
        return None if self.geometry is None else self.geometry.tile_size_level0

    @property
    def tile_size_level0_xy(self) -> tuple[int, int] | None:
        """Level-0 ``(width, height)`` of each tile's footprint (None when unknown); they
        differ only for slides with non-square pixels."""
        return None if self.geometry is None else self.geometry.tile_size_level0_xy

    def tile_boxes(self) -> np.ndarray:
        """(N, 4) int64 level-0 ``(x0, y0, x1, y1)`` of every tile: exact, whatever the grid.

        Raises
        ------
        EmbeddingsFileError
            The tile size cannot be known (see ``geometry.note``).
        """
        size = self.tile_size_level0_xy
        if size is None:
            note = self.geometry.note if self.geometry is not None else None
            raise EmbeddingsFileError(note or f"{self.path}: tile size unknown")
        return np.concatenate([self.coords, self.coords + np.asarray(size, np.int64)], axis=1)

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


def load_embeddings(
    path: str | os.PathLike[str], *, coords_file: str | os.PathLike[str] | None = None
) -> Embeddings:
    """Load an embeddings file written by gpfm, TRIDENT or CLAM.

    Parameters
    ----------
    path
        The ``.h5`` file.
    coords_file
        The patching file its tiles came from (CLAM's ``patches/<slide>.h5``, TRIDENT's
        ``patches/<slide>_patches.h5``), whose ``coords`` attributes give the tile geometry
        to a features file that lacks them (CLAM's ``h5_files/<slide>.h5``). None: beside a
        CLAM ``h5_files`` folder, a ``patches`` folder one or two levels up is looked at.
        Used only when it holds the same tiles.

    Returns
    -------
    Embeddings
        ``features`` (N, D) float32, ``coords`` (N, 2) int64, ``grid_rc`` (N, 2) int64,
        ``tissue_fraction`` (N,) or None, merged ``attrs``, ``geometry``, ``ink_fraction``
        (N,) or None.

    Raises
    ------
    EmbeddingsFileError
        Missing or unreadable file, no ``features`` / ``coords`` datasets, or a
        ``coords_file`` with other tiles.

    Warns
    -----
    GeometryWarning
        One line when the tile size had to be measured from the spacing, or cannot be known.
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
        tissue, ink = (
            np.asarray(f[name][:], dtype=np.float32) if name in f else None
            for name in ("tissue_fraction", "ink_fraction")
        )
    if features.ndim == 3 and features.shape[0] == 1:  # some writers add a batch axis
        features = features[0]
    if features.ndim == 1 and features.size == 0:  # TRIDENT writes an empty slide as (0,)
        features = features.reshape(0, 0)
    coords = coords.reshape(-1, 2)
    if features.shape[0] != coords.shape[0]:
        raise EmbeddingsFileError(
            f"{p}: {features.shape[0]} features but {coords.shape[0]} coords; file is corrupt"
        )
    extra = _coords_file_attrs(p, coords, coords_file)
    if extra:
        attrs = {**extra, **attrs}
    geometry, rc = tile_geometry(coords, attrs, grid_rc, name=p.name)
    if not geometry.known or geometry.source == "spacing":
        warnings.warn(geometry.note, GeometryWarning, stacklevel=2)
    elif geometry.note:
        log.info("%s", geometry.note)
    return Embeddings(features, coords, rc, tissue, attrs, p, geometry, ink)


def _coords_file_attrs(
    path: Path, coords: np.ndarray, coords_file: str | os.PathLike[str] | None
) -> dict[str, Any]:
    """Attributes of the patching file of ``path`` (given, or CLAM's beside it) if it matches."""
    import h5py

    if coords_file is None:
        if path.parent.name != "h5_files":
            return {}
        candidates = [
            up / "patches" / path.name for up in (path.parent.parent, path.parent.parent.parent)
        ]
        candidates = [c for c in candidates if c.is_file()]
        explicit = False
    else:
        candidates, explicit = [Path(coords_file)], True
    for cand in candidates:
        try:
            with h5py.File(cand, "r") as f:
                theirs = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
                cattrs = {k: _from_attr(v) for k, v in f["coords"].attrs.items()}
        except (OSError, KeyError) as exc:
            if explicit:
                raise EmbeddingsFileError(
                    f"{cand} is not a readable patching file with 'coords' ({exc})"
                ) from None
            continue
        if _same_rows(theirs, coords):
            log.info("tile geometry of %s from %s", path.name, cand)
            return cattrs
        if explicit:
            raise EmbeddingsFileError(
                f"{cand} holds other tiles than {path} ({len(theirs)} vs {len(coords)}); "
                "pass the patching file these features were made from"
            )
    return {}


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b):
        return True
    return bool(np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]))


def same_value(a: Any, b: Any) -> bool:
    """Whether two attribute values agree (floats to a relative 1e-6, arrays element-wise)."""
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
        if key not in attrs or not same_value(attrs[key], want):
            return False
    return True
