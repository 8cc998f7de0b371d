"""Open a cohort folder lazily: the cohort table now, each slide's features when asked for.

>>> cohort = open_cohort("cohort/")                        # doctest: +SKIP
>>> cohort.slides[:2]                                      # names from the manifest
['case-001', 'case-002']
>>> x = cohort.features("case-001")                        # (N, D) memory-mapped, read-only
>>> emb = cohort.load("case-001")                          # everything: coords, geometry ...

Features are memory-mapped straight from the HDF5 file where the format allows it: the
writer (:class:`gpfm_core.embed.storage.EmbeddingWriter`) stores ``features`` as one
contiguous, uncompressed dataset, whose bytes sit at one offset of the file
(``h5py``'s ``Dataset.id.get_offset()``), so ``numpy.memmap`` reads them with no copy and
only the pages touched are read. Chunked or compressed datasets (other tools' files) are
read into memory instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpfm_core.cohort.table import TableRow, read_table, table_path
from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    import pandas as pd

    from gpfm_core.embed import Embeddings

log = logging.getLogger(__name__)

__all__ = ["Cohort", "CohortError", "check_unique_slides", "open_cohort", "read_features"]

PathLike = str | os.PathLike[str]


class CohortError(GpfmError):
    """A cohort folder cannot be opened as asked (one line naming the fix)."""


def read_features(path: PathLike, *, mmap: bool = True) -> np.ndarray:
    """The ``features`` (N, D) of one feature file, memory-mapped when the layout allows.

    Parameters
    ----------
    path
        A feature file (gpfm's, TRIDENT's or CLAM's ``.h5``).
    mmap
        Memory-map a contiguous, uncompressed dataset (read-only, no copy); False reads it.

    Returns
    -------
    numpy.ndarray
        (N, D) in the file's dtype (float32, or float16 for ``--fp16`` files); a
        ``numpy.memmap`` when mapped.

    Raises
    ------
    EmbeddingsFileError
        Missing or unreadable file, or no ``features`` dataset.
    """
    import h5py

    from gpfm_core.embed.loading import EmbeddingsFileError

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            if "features" not in f:
                raise EmbeddingsFileError(f"{p} has no 'features' dataset; not a feature file")
            ds = f["features"]
            shape, dtype = tuple(ds.shape), ds.dtype
            # contiguous storage (no chunks, hence no compression or filters) has one offset;
            # None also when nothing was ever written (an empty dataset)
            offset = ds.id.get_offset() if mmap and ds.chunks is None else None
            if offset is None or len(shape) != 2:
                return _as_2d(np.asarray(ds[()]))
    except FileNotFoundError:
        raise EmbeddingsFileError(f"{p} does not exist; embed the slide first") from None
    except OSError as exc:
        raise EmbeddingsFileError(f"{p} is not a readable HDF5 file ({exc})") from None
    return np.memmap(p, dtype=dtype, mode="r", offset=int(offset), shape=shape)


def _as_2d(data: np.ndarray) -> np.ndarray:
    if data.ndim == 3 and data.shape[0] == 1:
        return data[0]
    if data.ndim == 1 and data.size == 0:
        return data.reshape(0, 0)
    return data


@dataclass(frozen=True)
class Cohort:
    """A cohort folder at one encoder and tiling: its table, features on demand.

    Attributes
    ----------
    folder : Path
        The cohort folder.
    rows : tuple of TableRow
        One per slide (cohort-table rows), in table order.
    """

    folder: Path
    rows: tuple[TableRow, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self.slides)

    def __contains__(self, slide_id: object) -> bool:
        return any(r.slide_id == slide_id for r in self.rows)

    @property
    def slides(self) -> list[str]:
        """The slides' names (``slide_id``), in table order."""
        return [r.slide_id for r in self.rows]

    @property
    def n_tiles(self) -> int:
        """Tiles in the whole cohort (from the table; no file opened)."""
        return sum(max(r.n_tiles, 0) for r in self.rows)

    @property
    def encoder(self) -> str:
        """The encoder name shared by every slide."""
        return self.rows[0].encoder if self.rows else ""

    @property
    def embed_dim(self) -> int:
        """D, the features' width."""
        return self.rows[0].embed_dim if self.rows else 0

    def row(self, slide_id: str) -> TableRow:
        """The table row of a slide.

        Raises
        ------
        CohortError
            No slide of that name.
        """
        for r in self.rows:
            if r.slide_id == slide_id:
                return r
        raise CohortError(
            f"no slide {slide_id!r} in {self.folder} (it has {len(self.rows)}: "
            f"{', '.join(self.slides[:5])}{' ...' if len(self.rows) > 5 else ''})"
        )

    def path(self, slide_id: str) -> Path:
        """The feature file of a slide."""
        return self.row(slide_id).path_in(self.folder)

    def features(self, slide_id: str, *, mmap: bool = True) -> np.ndarray:
        """(N, D) features of one slide (see :func:`read_features`)."""
        return read_features(self.path(slide_id), mmap=mmap)

    def coords(self, slide_id: str) -> np.ndarray:
        """(N, 2) int64 level-0 ``(x, y)`` top-left corners of one slide's tiles."""
        import h5py

        with h5py.File(self.path(slide_id), "r") as f:
            return np.asarray(f["coords"][()], dtype=np.int64).reshape(-1, 2)

    def load(self, slide_id: str) -> Embeddings:
        """Everything of one slide: :func:`gpfm_core.embed.load_embeddings`."""
        from gpfm_core.embed import load_embeddings

        return load_embeddings(self.path(slide_id))

    def iter_features(self, *, mmap: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """``(slide_id, features (N, D))`` per slide, one file open at a time."""
        for r in self.rows:
            yield r.slide_id, read_features(r.path_in(self.folder), mmap=mmap)

    def to_pandas(self) -> pd.DataFrame:
        """The table as a ``pandas.DataFrame`` (one row per slide)."""
        import pandas as pd

        return pd.DataFrame([r.__dict__ for r in self.rows])


def check_unique_slides(rows: Iterable[TableRow], where: PathLike) -> None:
    """Raise :class:`CohortError` when two rows of one feature set share a ``slide_id``.

    ``gpfm embed`` keeps one row per slide (a new row supersedes the old one); two rows
    of a name mean a hand-edited table or one from an older gpfm, and a slide that would be
    counted twice (AnnData refuses it, a MIL model would train on it twice).
    """
    files: dict[str, list[str]] = {}
    for r in rows:
        files.setdefault(r.slide_id, []).append(r.file)
    dup = next(((sid, f) for sid, f in files.items() if len(f) > 1), None)
    if dup is not None:
        sid, f = dup
        raise CohortError(
            f"{where}: slide_id {sid!r} has {len(f)} rows ({', '.join(f)}); delete the stale "
            "row(s) (the file whose content_id is not the slide's now) so each slide has one"
        )


def open_cohort(
    folder: PathLike,
    *,
    encoder: str | None = None,
    tiling: str | None = None,
    weights_hash: str | None = None,
) -> Cohort:
    """Open a cohort folder: read its table; no feature file is opened.

    Parameters
    ----------
    folder
        A folder ``gpfm embed --out`` wrote (``cohort.csv`` and the feature files).
    encoder, tiling, weights_hash
        Which features, when the folder holds several encoders or tilings: an encoder name,
        a tiling folder name (``"0.5mpp_224px_0px_overlap"``), a weights hash (or its
        first characters).

    Returns
    -------
    Cohort

    Raises
    ------
    CohortError
        No cohort table, nothing matches, several feature sets match (the message
        lists them and the option that picks one), or two rows name one slide_id.
    """
    root = Path(folder)
    if not table_path(root).is_file():
        raise CohortError(
            f"{root} has no cohort table ({table_path(root).name}); embed into it with "
            "gpfm embed --out FOLDER"
        )
    rows = [
        r
        for r in read_table(root)
        if (encoder is None or r.encoder == encoder)
        and (tiling is None or r.tiling == tiling)
        and (weights_hash is None or r.weights_hash.startswith(weights_hash))
    ]
    sets = sorted({(r.encoder, r.weights_hash, r.tiling) for r in rows})
    if not sets:
        raise CohortError(
            f"no features in {root} for encoder={encoder}, tiling={tiling}, "
            f"weights_hash={weights_hash}; see {table_path(root)} for what is there"
        )
    if len(sets) > 1:
        listed = "; ".join(f"{e} {w[:8]} {t}" for e, w, t in sets)
        raise CohortError(
            f"{root} holds {len(sets)} feature sets ({listed}); pick one with encoder=, "
            "tiling= or weights_hash= (CLI: --encoder / --tiling)"
        )
    check_unique_slides(rows, table_path(root))
    missing = [r.file for r in rows if not r.path_in(root).is_file()]
    if missing:
        log.warning(
            "%d feature file(s) of the table are missing, e.g. %s", len(missing), missing[0]
        )
        rows = [r for r in rows if r.file not in set(missing)]
    return Cohort(root, tuple(rows))
