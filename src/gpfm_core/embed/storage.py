"""One HDF5 file of tile embeddings per slide, in the TRIDENT / CLAM layout.

Where the file lives is :mod:`gpfm_core.embed.layout`'s business
(``<out>/<tiling>/features_<encoder>-<hash8>/<slide>.h5``). Inside it:

===================  ===========  =====================================================
dataset              shape        meaning
===================  ===========  =====================================================
``features``         (N, D)       float32 (or float16) embedding of each tile
``coords``           (N, 2)       int64 level-0 top-left ``(x, y)`` of each tile
``grid_rc``          (N, 2)       int64 ``(row, col)`` of each tile in the full grid
``tissue_fraction``  (N,)         float32 tissue fraction under each tile
``ink_fraction``     (N,)         float32 marker ink / marking dye under each tile (when given)
===================  ===========  =====================================================

Attributes: the file's root holds gpfm's own names (``encoder``, ``weights_hash``,
``requested_mpp``, ``effective_mpp``, ``tile_px``, ``tile_size_level0``, ``stride_level0``,
``read_level``, ``overlap_px``, ``level0_width`` / ``level0_height``, ``slide_id``,
``slide_path``, ``grid_rows`` / ``grid_cols``, ``min_tissue``, ``tissue_source``,
``tissue_detector``, ``tissue_params``, ``gpfm_core_version``, ``created`` ...).
``coords.attrs`` repeats the tiling under TRIDENT's names (``patch_size``,
``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``,
``name``, ``savetodir``, ``level0_width``, ``level0_height``) and CLAM's (``patch_level``);
``features.attrs`` holds TRIDENT's ``name``, ``savetodir`` and ``encoder``. So TRIDENT / CLAM
readers (``f["features"][:]``, ``f["coords"][:]``) load the file unchanged.

The file is written through :func:`gpfm_core._atomic.atomic_path`: a temporary file with an
unpredictable name beside the target, renamed only once complete. A run killed mid-slide
leaves no ``.h5``; the next writer of that name (which holds
:func:`~gpfm_core.embed.layout.slide_lock`) removes the leftover and starts the slide again.
Reading: :mod:`gpfm_core.embed.loading`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core._atomic import atomic_path
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

#: Version of this file layout, stored as the ``gpfm_format`` root attribute.
FORMAT_VERSION = 1


def _to_attr(value: Any) -> Any:
    """Convert a Python value into something ``h5py`` stores as an attribute."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, list | tuple):
        return np.asarray(value)
    return value


def _from_attr(value: Any) -> Any:
    """Convert an ``h5py`` attribute into a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _set_attrs(target: Any, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if value is None:
            continue
        target.attrs[key] = _to_attr(value)


class _Aborted(Exception):
    """Thrown into the atomic write to make it discard the temporary file."""


class EmbeddingWriter:
    """Stream features of one slide into a temporary file, then rename it atomically.

    Only one writer per ``path`` may run at a time: hold
    :func:`~gpfm_core.embed.layout.slide_lock` (``iter_embed_slide`` does).

    Parameters
    ----------
    path
        The final ``.h5`` path.
    coords, grid_rc
        (N, 2) int64 arrays, written at once.
    tissue_fraction
        (N,) float array.
    ink_fraction
        (N,) float array of marker ink under each tile (:attr:`TileGrid.ink_fraction`), or
        None to leave the dataset out.
    embed_dim
        D of the features to come.
    dtype
        ``"float32"`` or ``"float16"`` on disk.
    attrs, coords_attrs, features_attrs
        Root, ``coords`` and ``features`` attributes (``None`` values are skipped).

    Examples
    --------
    >>> with EmbeddingWriter(p, coords=c, grid_rc=rc, tissue_fraction=t,
    ...                      embed_dim=384) as w:            # doctest: +SKIP
    ...     w.write(np.arange(64), feats)                    # (64,) and (64, 384)
    ...     w.commit()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        coords: np.ndarray,
        grid_rc: np.ndarray,
        tissue_fraction: np.ndarray,
        embed_dim: int,
        ink_fraction: np.ndarray | None = None,
        dtype: str = "float32",
        attrs: Mapping[str, Any] | None = None,
        coords_attrs: Mapping[str, Any] | None = None,
        features_attrs: Mapping[str, Any] | None = None,
    ) -> None:
        import h5py

        if dtype not in ("float32", "float16"):
            raise GpfmError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
        self.path = Path(path)
        self.n = len(coords)
        self.embed_dim = int(embed_dim)
        self.written = np.zeros(self.n, dtype=bool)
        self._committed = False
        self._atomic = atomic_path(self.path, parents=True)
        self.tmp: Path = self._atomic.__enter__()
        self._atomic_open = True
        try:
            self._file = h5py.File(self.tmp, "w")
        except BaseException:
            self._end_atomic(ok=False)
            raise
        try:
            f = self._file
            # Contiguous (unchunked) datasets: each batch write goes straight to its rows,
            # and gpfm_core.cohort.read_features memory-maps the finished file (keep it so).
            self._features = f.create_dataset(
                "features", shape=(self.n, self.embed_dim), dtype=dtype
            )
            c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
            f.create_dataset("grid_rc", data=np.asarray(grid_rc, dtype=np.int64).reshape(-1, 2))
            f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32))
            if ink_fraction is not None:
                f.create_dataset("ink_fraction", data=np.asarray(ink_fraction, dtype=np.float32))
            _set_attrs(f, {"gpfm_format": FORMAT_VERSION, "features_dtype": dtype, **(attrs or {})})
            _set_attrs(c, coords_attrs or {})
            _set_attrs(self._features, features_attrs or {})
        except BaseException:
            self.abort()
            raise

    def write(self, indices: np.ndarray, features: np.ndarray) -> None:
        """Write ``features`` (B, D) to rows ``indices`` (B,) of the tile grid."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        feats = np.asarray(features)
        if feats.shape != (idx.size, self.embed_dim):
            raise ValueError(
                f"features {feats.shape} do not fit indices ({idx.size},) x D={self.embed_dim}"
            )
        if idx.size == 0:
            return
        order = np.argsort(idx, kind="stable")
        idx, feats = idx[order], feats[order]
        dtype = self._features.dtype
        if idx[-1] - idx[0] + 1 == idx.size and np.all(np.diff(idx) == 1):
            self._features[int(idx[0]) : int(idx[-1]) + 1] = feats.astype(dtype, copy=False)
        else:
            self._features[idx] = feats.astype(dtype, copy=False)
        self.written[idx] = True

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Add root attributes (e.g. timings known only at the end)."""
        _set_attrs(self._file, attrs)

    def commit(self) -> Path:
        """Close the file and rename it to its final name; every row must be written."""
        missing = int((~self.written).sum())
        if missing:
            raise RuntimeError(f"{missing} of {self.n} tiles were not written; not committing")
        self._file.flush()
        self._file.close()
        self._end_atomic(ok=True)  # fsync, rename onto self.path
        self._committed = True
        log.info("wrote %s (%d tiles)", self.path, self.n)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; the final path is untouched (safe twice)."""
        if self._committed:
            return
        with contextlib.suppress(Exception):
            self._file.close()
        self._end_atomic(ok=False)

    def _end_atomic(self, *, ok: bool) -> None:
        """Leave the ``atomic_path`` block once: rename (ok) or remove the temporary file."""
        if not self._atomic_open:
            return
        self._atomic_open = False
        if ok:
            self._atomic.__exit__(None, None, None)
        else:
            with contextlib.suppress(_Aborted):
                self._atomic.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()
