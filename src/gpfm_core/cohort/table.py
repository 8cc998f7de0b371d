"""The cohort table: ``<cohort>/cohort.csv``, one row per feature file of the folder.

The per-slide feature files keep TRIDENT's layout (:mod:`gpfm_core.embed.layout`); the table
says what is there, so nothing needs to open them to know:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``slide_id``        the slide's name in the cohort (manifest ``slide_id``, else its stem)
``file``            the feature file, relative to the cohort folder (``/``-separated)
``slide_path``      the slide, absolute
``content_id``      gpfm's 16-hex content id of the slide (the file's ``slide_id`` attribute)
``encoder``         encoder name; ``weights_hash`` its weights' hash
``tiling``          ``<mpp>mpp_<tile_px>px_<overlap>px_overlap``; also ``mpp``, ``tile_px``,
                    ``overlap_px`` as numbers
``n_tiles``         tiles (rows of ``features``); ``embed_dim`` D; ``dtype`` on disk
``sha256``          SHA-256 of the feature file's bytes (check a copy with ``sha256sum``)
``settings``        16-hex hash of every setting that decides reuse (the file's reuse key)
``slide_size``,     the slide's and the feature file's size and modification time when the row
``slide_mtime_ns``, was written: a rerun that finds both unchanged skips the slide without
``file_size``,      opening either
``file_mtime_ns``
``created``         when the row was written (UTC)
==================  ==========================================================================

CSV rather than Parquet: it needs no new dependency (Parquet needs pyarrow), every tool
reads it (pandas, R, a spreadsheet, ``grep``), it is small (about 300 bytes a slide: 3 MB for
10,000 slides, read in tens of milliseconds), and the table is rewritten whole under a lock,
so Parquet's column compression and appends would buy nothing here.

Runs update the table under its lock (:func:`gpfm_core.embed.layout.slide_lock` on the
table), merging by ``file``: two runs writing one cohort at once both keep their rows.

A ``slide_id`` has one row per feature set (encoder, weights, tiling): a new row of a
``slide_id`` supersedes its older row with another ``file`` (the slide's file was replaced by
another slide, so its content id and feature file changed, or a manifest gave the name to
another file). The old feature file is removed (unless another row still names it): it holds
features of a slide the cohort no longer has, which tools reading the folder
(``gpfm train-mil --features``, ``gpfm index``) would otherwise pick up; a run that keeps
the cohort index current (``gpfm embed``) removes it from the index in the same run
(``update_table(on_removed=...)``). Each superseded row is a one-line
:class:`SupersededWarning` naming the old file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gpfm_core._atomic import write_atomic
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

__all__ = [
    "TABLE_NAME",
    "CohortTableError",
    "SupersededWarning",
    "TableRow",
    "file_sha256",
    "read_table",
    "row_for_file",
    "rows_beside",
    "settings_hash",
    "table_folders",
    "table_path",
    "update_table",
]

PathLike = str | os.PathLike[str]

#: The cohort table's file name inside the cohort folder.
TABLE_NAME = "cohort.csv"


class CohortTableError(GpfmError):
    """The cohort table cannot be read (one line naming the file and the fix)."""


class SupersededWarning(UserWarning):
    """A slide_id's new feature file superseded its old one (which was removed)."""


@dataclass(frozen=True)
class TableRow:
    """One row of the cohort table (see the module docstring for each column)."""

    slide_id: str
    file: str
    slide_path: str
    content_id: str
    encoder: str
    weights_hash: str
    tiling: str
    mpp: float
    tile_px: int
    overlap_px: int
    n_tiles: int
    embed_dim: int
    dtype: str
    sha256: str
    settings: str
    slide_size: int
    slide_mtime_ns: int
    file_size: int
    file_mtime_ns: int
    created: str

    @classmethod
    def from_csv(cls, raw: Mapping[str, str]) -> TableRow:
        """Parse one CSV row (strings) into typed fields (missing numbers: -1 / NaN)."""
        return cls(**{name: parse(raw.get(name) or "") for name, parse in _PARSERS.items()})

    def to_csv(self) -> dict[str, str]:
        """The row as strings, floats written so they read back exactly."""
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in asdict(self).items()}

    def path_in(self, folder: PathLike) -> Path:
        """The feature file's path inside the cohort ``folder``."""
        return Path(folder, self.file)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(TableRow))
_PARSERS: dict[str, Any] = {
    f.name: (
        (lambda t: int(t) if t else -1)
        if f.type == "int"
        else (lambda t: float(t) if t else float("nan"))
        if f.type == "float"
        else str
    )
    for f in fields(TableRow)
}


def table_path(folder: PathLike) -> Path:
    """``<folder>/cohort.csv``."""
    return Path(folder) / TABLE_NAME


def table_folders(feature_file: PathLike) -> tuple[Path, ...]:
    """Where a cohort table naming ``feature_file`` may lie, nearest first.

    ``gpfm embed --out COHORT`` writes ``COHORT/cohort.csv`` and the feature files into
    ``COHORT/<tiling>/features_<encoder>/``: the file's folder and the two above it.
    """
    p = Path(feature_file)
    return (p.parent, *p.parents[1:3])


def rows_beside(
    files: Iterable[PathLike],
    *,
    on_error: Callable[[CohortTableError], None] | None = None,
) -> dict[Path, TableRow]:
    """Feature file -> the row of the cohort table beside it that names it.

    The table is looked for in :func:`table_folders` of each file (the nearest naming the
    file wins). This is how tools that are given a folder of feature files (``gpfm index``,
    ``gpfm train-mil`` / ``gpfm eval``) learn a file's ``slide_id`` (the manifest's name).

    Parameters
    ----------
    files
        Feature files (paths are normalised, not resolved: give them as the caller will
        look them up).
    on_error
        Called with a table that cannot be read, which is then ignored; default: raise.

    Returns
    -------
    dict
        ``Path(os.path.normpath(file))`` -> :class:`TableRow`, for the files a table names
        (others are left out).

    Raises
    ------
    CohortTableError
        A table cannot be read and ``on_error`` is None.
    """
    out: dict[Path, TableRow] = {}
    seen: set[Path] = set()
    for folder in sorted({Path(f).parent for f in files}):
        for cand in table_folders(folder / "_"):
            if cand in seen:
                continue
            seen.add(cand)
            if not table_path(cand).is_file():
                continue
            try:
                rows = read_table(cand)
            except CohortTableError as exc:
                if on_error is None:
                    raise
                on_error(exc)
                continue
            for row in rows:
                out.setdefault(Path(os.path.normpath(cand / row.file)), row)
    return out


def settings_hash(key: Mapping[str, Any]) -> str:
    """16 hex characters naming a reuse key (:func:`gpfm_core.embed._attrs.reuse_key`)."""
    text = json.dumps(dict(key), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_table(folder: PathLike) -> list[TableRow]:
    """The rows of ``<folder>/cohort.csv``; [] when there is none.

    Raises
    ------
    CohortTableError
        The file exists but is not a cohort table (no ``file`` column, or a bad value).
    """
    path = table_path(folder)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CohortTableError(f"cannot read {path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return []
    if "file" not in reader.fieldnames or "slide_id" not in reader.fieldnames:
        raise CohortTableError(
            f"{path} is not a cohort table (no 'file' / 'slide_id' column); move it away and "
            "run gpfm embed again to rebuild it"
        )
    try:
        return [TableRow.from_csv(r) for r in reader]
    except (TypeError, ValueError) as exc:
        raise CohortTableError(
            f"{path} line {reader.line_num}: {exc}; fix or delete the line (a rerun rebuilds it)"
        ) from None


def _write(folder: Path, rows: Iterable[TableRow]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_csv())
    return write_atomic(table_path(folder), buf.getvalue())


def update_table(
    folder: PathLike,
    rows: Iterable[TableRow],
    *,
    drop_missing: bool = True,
    on_removed: Callable[[list[Path]], None] | None = None,
) -> Path:
    """Merge ``rows`` into the cohort table (by ``file``) and write it atomically, under its lock.

    Parameters
    ----------
    folder
        The cohort folder (created).
    rows
        New or replaced rows; a row replaces the one with the same ``file``, and supersedes
        the row of its ``slide_id`` in its feature set (encoder, weights, tiling) with another
        ``file``, whose file is removed when no row names it any more (a one-line
        :class:`SupersededWarning` each).
    drop_missing
        Drop rows whose feature file no longer exists.
    on_removed
        Called, once the table is written and its lock released, with the feature files
        removed as superseded (absolute paths; not called when none was), e.g. to drop
        them from the cohort index (:meth:`gpfm_core.cohort.index.IndexFeeder.remove`).

    Returns
    -------
    Path
        ``<folder>/cohort.csv``.
    """
    from gpfm_core.embed.layout import slide_lock

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    new = {r.file: r for r in rows}
    owner = {_identity(r): r for r in new.values()}
    with slide_lock(table_path(folder)):
        merged = {r.file: r for r in read_table(folder)}
        gone = [r for f, r in merged.items() if f not in new and _identity(r) in owner]
        for r in gone:
            del merged[r.file]
        merged.update(new)
        named = {r.file for r in merged.values()}
        removed_files: list[Path] = []
        for old in gone:
            by = owner[_identity(old)]
            removed = old.file not in named
            if removed:
                old.path_in(folder).unlink(missing_ok=True)
                removed_files.append(Path(os.path.abspath(old.path_in(folder))))
            warnings.warn(
                f"slide {old.slide_id!r} is now {by.slide_path} (content id {by.content_id}, "
                f"{by.file}); its old row {old.file} (content id {old.content_id}) is superseded"
                + (" and that file removed" if removed else ""),
                SupersededWarning,
                stacklevel=2,
            )
        kept = [
            r
            for r in merged.values()
            if r.file in new or not drop_missing or r.path_in(folder).is_file()
        ]
        kept.sort(key=lambda r: (r.tiling, r.encoder, r.weights_hash, r.slide_id, r.file))
        written = _write(folder, kept)
    if removed_files and on_removed is not None:
        on_removed(removed_files)
    return written


def _identity(row: TableRow) -> tuple[str, str, str, str]:
    """What names one slide's features: its ``slide_id`` in one feature set."""
    return (row.slide_id, row.encoder, row.weights_hash, row.tiling)


def row_for_file(
    path: PathLike,
    folder: PathLike,
    *,
    slide_id: str,
    slide_path: PathLike,
    settings: str,
    sha256: str | None = None,
) -> TableRow:
    """The table row of a finished feature file (reads its attributes and hashes its bytes).

    Parameters
    ----------
    path
        The feature file, inside ``folder``.
    folder
        The cohort folder.
    slide_id
        The slide's name in the cohort.
    slide_path
        The slide file (its size and mtime are recorded).
    settings
        :func:`settings_hash` of the reuse key the file was made with.
    sha256
        The file's hash when already known (else computed).
    """
    from gpfm_core.embed.layout import tiling_dirname
    from gpfm_core.embed.loading import read_attrs

    p = Path(path)
    attrs = read_attrs(p)
    st = p.stat()
    try:
        sst = os.stat(slide_path)
        slide_size, slide_mtime = sst.st_size, sst.st_mtime_ns
    except OSError:
        slide_size, slide_mtime = -1, -1
    mpp = float(attrs.get("requested_mpp", float("nan")))
    tile_px = int(attrs.get("tile_px", -1))
    overlap = int(attrs.get("overlap_px", 0))
    return TableRow(
        slide_id=slide_id,
        file=p.relative_to(folder).as_posix(),
        slide_path=os.path.abspath(slide_path),
        content_id=str(attrs.get("slide_id", "")),
        encoder=str(attrs.get("encoder", "")),
        weights_hash=str(attrs.get("weights_hash", "")),
        tiling=tiling_dirname(mpp=mpp, tile_px=tile_px, overlap_px=overlap),
        mpp=mpp,
        tile_px=tile_px,
        overlap_px=overlap,
        n_tiles=int(attrs.get("n_tiles", -1)),
        embed_dim=int(attrs.get("embed_dim", -1)),
        dtype=str(attrs.get("features_dtype", "")),
        sha256=sha256 or file_sha256(p),
        settings=settings,
        slide_size=slide_size,
        slide_mtime_ns=slide_mtime,
        file_size=st.st_size,
        file_mtime_ns=st.st_mtime_ns,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
