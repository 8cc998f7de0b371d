"""What a cohort is made of: slide paths, globs and manifests, read into :class:`CohortEntry`.

A manifest is a CSV file with a header::

    path,slide_id,mpp
    /data/site-a/S01.svs,case-001,
    site-b/S01.svs,case-002,0.25

``path`` (TRIDENT's ``wsi`` is accepted too) is required; a relative path is taken from the
manifest's folder. ``slide_id`` is the slide's name in the cohort (the report, the cohort
table, AnnData's ``obs["slide"]``), e.g. a case id; it defaults to the file stem, which is also
the stem of the slide's feature file, so ``gpfm train-mil`` / ``gpfm eval`` find the file by it.
When several slides of a cohort share a stem (``site-a/S01.svs``, ``site-b/S01.svs``), the one
listed first keeps ``<stem>`` and each later one is ``<stem>-<id8>`` (the first 8 hex digits of
its content id; those slides alone are opened to read it), the name its feature file takes
too (:attr:`CohortEntry.unique_name`); this depends on the inputs' order and contents only,
never on which slide finishes first. It is *not* gpfm's content id (the
16-hex ``Slide.info.slide_id``, stored as ``content_id`` in the cohort table). ``mpp`` is the
slide's level-0 µm/px, for slides whose metadata lacks it or is wrong (as ``--slide-mpp``, per
slide). Reading a manifest opens no slide, so a list of 10,000 slides is read in well under a
second.
"""

from __future__ import annotations

import csv
import glob
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gpfm_core.errors import GpfmError

__all__ = ["CohortEntry", "ManifestError", "read_cohort_inputs", "read_manifest"]

PathLike = str | os.PathLike[str]

_PATH_COLUMNS = ("path", "wsi")
_GLOB_CHARS = set("*?[")


class ManifestError(GpfmError):
    """A manifest or cohort input cannot be used (one line naming the row and the fix)."""


@dataclass(frozen=True)
class CohortEntry:
    """One slide of a cohort.

    Attributes
    ----------
    path : Path
        Absolute path of the slide (not resolved through symlinks; not checked to exist).
    slide_id : str
        The slide's name in the cohort (manifest ``slide_id``, else the file stem).
    mpp : float or None
        Level-0 µm/px override for this slide (manifest ``mpp``), or None for the metadata's.
    unique_name : bool
        The feature file takes ``<stem>-<id8>.h5`` (an earlier slide of the cohort has this
        stem and takes ``<stem>.h5``), so which slide gets which name never depends on
        which one finishes first.
    default_id : bool
        ``slide_id`` was derived from the file name (not given by a manifest).
    """

    path: Path
    slide_id: str
    mpp: float | None = None
    unique_name: bool = False
    default_id: bool = False


def _looks_like_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def read_manifest(path: PathLike) -> list[CohortEntry]:
    """Read a cohort manifest (CSV with a ``path`` column; optional ``slide_id``, ``mpp``).

    Parameters
    ----------
    path
        The CSV file. Column names are matched case-insensitively; other columns are ignored.

    Returns
    -------
    list of CohortEntry
        One per row, in file order; rows with an empty ``path`` are skipped.

    Raises
    ------
    ManifestError
        No ``path`` column, an ``mpp`` that is not a positive number, or a ``slide_id``
        or path given twice.
    """
    return _entries(_manifest_rows(path), where=f"manifest {path}")


def _manifest_rows(path: PathLike) -> list[tuple[int, Path, str | None, float | None]]:
    """``(line, absolute path, slide_id or None, mpp or None)`` per row of a manifest."""
    p = Path(path)
    base = p.parent.absolute()
    try:
        fh = p.open(newline="", encoding="utf-8-sig")  # Excel writes a BOM
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {p}: {exc.strerror or exc}") from None
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"manifest {p} is empty; write a header line 'path,slide_id,mpp'")
        cols = {name.strip().lower(): i for i, name in enumerate(header)}
        ipath = next((cols[c] for c in _PATH_COLUMNS if c in cols), None)
        if ipath is None:
            raise ManifestError(
                f"manifest {p} has no 'path' column (columns: {', '.join(header)}); "
                "name the column of slide files 'path'"
            )
        iid, impp = cols.get("slide_id"), cols.get("mpp")
        rows: list[tuple[int, Path, str | None, float | None]] = []
        for lineno, row in enumerate(reader, start=2):
            raw = row[ipath].strip() if ipath < len(row) else ""
            if not raw:
                continue
            sid = row[iid].strip() if iid is not None and iid < len(row) else ""
            mpp_text = row[impp].strip() if impp is not None and impp < len(row) else ""
            mpp = _parse_mpp(mpp_text, p, lineno)
            slide = Path(os.path.expanduser(raw))
            if not slide.is_absolute():
                slide = base / slide
            rows.append((lineno, Path(os.path.normpath(slide)), sid or None, mpp))
    return rows


def _parse_mpp(text: str, manifest: Path, lineno: int) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ManifestError(
            f"manifest {manifest} line {lineno}: mpp {text!r} is not a positive number "
            "(level-0 µm/px, e.g. 0.25); leave it empty to use the slide's metadata"
        )
    return value


def _entries(
    rows: Iterable[tuple[int, Path, str | None, float | None]], *, where: str, unit: str = "lines"
) -> list[CohortEntry]:
    """Entries with unique paths and names; default names are stems (see the module doc)."""
    rows = list(rows)
    seen: dict[Path, int] = {}
    for lineno, path, _, _ in rows:
        if path in seen:
            raise ManifestError(
                f"{where}: {path} is listed twice ({unit} {seen[path]} and {lineno}); "
                "list each slide once"
            )
        seen[path] = lineno
    first_of_stem: dict[str, Path] = {}
    for _, path, _, _ in rows:
        first_of_stem.setdefault(slide_stem(path), path)
    out: list[CohortEntry] = []
    names: dict[str, int] = {}
    for lineno, path, sid, mpp in rows:
        stem = slide_stem(path)
        later = first_of_stem[stem] != path
        name = sid if sid is not None else unique_slide_id(path) if later else stem
        if name in names:
            raise ManifestError(
                f"{where}: slide_id {name!r} names two slides ({unit} {names[name]} and "
                f"{lineno}); give each slide its own slide_id"
            )
        names[name] = lineno
        out.append(CohortEntry(path, name, mpp, unique_name=later, default_id=sid is None))
    return out


def slide_stem(path: PathLike) -> str:
    """The stem a slide's feature file takes (:func:`gpfm_core.slide.slide_stem`)."""
    from gpfm_core.slide._formats import slide_stem as stem

    return stem(path)


def slide_content_id(path: PathLike) -> str | None:
    """The slide's content id (:attr:`SlideInfo.slide_id`, the slide is opened to read it);
    None when it cannot be opened (it will fail to embed anyway)."""
    from gpfm_core.slide import open_slide

    try:
        with open_slide(path) as slide:
            return str(slide.info.slide_id)
    except (GpfmError, OSError):
        return None


def unique_slide_id(path: PathLike, content_id: str | None = None) -> str:
    """``<stem>-<id8>``: the default name of a slide whose stem an earlier slide has.

    ``<id8>`` is the first 8 hex digits of the slide's content id (``content_id``, else read
    with :func:`slide_content_id`), as its feature file is named
    (:func:`gpfm_core.embed.layout.slide_file_names`). A slide that cannot be opened gets
    ``<stem>-<folder>``.
    """
    from gpfm_core.embed.layout import slide_file_names

    content_id = content_id if content_id is not None else slide_content_id(path)
    if content_id is None:
        return f"{slide_stem(path)}-{Path(path).parent.name}"
    return Path(slide_file_names(path, content_id)[1]).stem


def read_cohort_inputs(items: Iterable[PathLike], *, mpp: float | None = None) -> list[CohortEntry]:
    """Slides from a mix of slide paths, globs and manifests (``*.csv``), in the order given.

    Parameters
    ----------
    items
        Each is a manifest (a ``.csv`` file), a glob (``"slides/**/*.svs"``, expanded here,
        sorted, so a shell that did not expand it is fine) or a slide path (kept even when
        missing: the run lists it as failed and goes on).
    mpp
        Level-0 µm/px for every slide without a manifest ``mpp`` (``--slide-mpp``).

    Returns
    -------
    list of CohortEntry

    Raises
    ------
    ManifestError
        A bad manifest, a glob that matches nothing, or one slide listed twice.
    """
    rows: list[tuple[int, Path, str | None, float | None]] = []
    n = 0
    for item in items:
        text = os.fspath(item)
        if text.lower().endswith(".csv") and not _looks_like_glob(text):
            if not Path(text).is_file():
                raise ManifestError(f"manifest {text} not found; check the path")
            for _, slide, sid, slide_mpp in _manifest_rows(text):
                n += 1
                rows.append((n, slide, sid, slide_mpp if slide_mpp is not None else mpp))
            continue
        if _looks_like_glob(text) and not os.path.exists(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if not m.lower().endswith(".csv")]
            if not matches:
                raise ManifestError(f"{text!r} matches no file; check the pattern and folder")
        else:
            matches = [text]
        for m in matches:
            n += 1
            rows.append((n, Path(os.path.abspath(os.path.expanduser(m))), None, mpp))
    return _entries(rows, where="the cohort", unit="entries")
