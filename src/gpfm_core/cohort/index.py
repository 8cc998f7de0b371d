"""A similarity index over every tile of a cohort: "where else does this look like this?".

Two stages per query:

1. **Candidates** from a FAISS inverted-file index with product-quantised codes
   (``IVF{nlist},PQ{m}``: ``m`` bytes per tile, ``m = D / 16``, 64 bytes for 1024-d), or,
   while the cohort is smaller than ``train_min`` tiles (default 50,000) and the quantisers
   are not trained yet, from an exact flat inner-product search.
2. **Exact re-rank**: the cosine of the centred query to each candidate's *original* features,
   read from a float16 copy per slide (one ``.npy`` each; the candidates' rows are read with
   ``pread`` through the page cache rather than memory-mapped, so they never count in the
   process's RSS). Within the candidates the answer is exact
   (up to float16 storage, ~1e-3 in cosine); its recall against an exhaustive search is
   measured by ``tests/core/test_cohort_index.py`` and ``benchmarks/bench_index.py``.

**Centring.** Features are compared as cosines of *centred* features (the cohort mean
subtracted), as the dock's similarity does, with the same arithmetic
(:func:`gpfm_core.analysis.similarity.center_features` with ``unit=True``): embeddings share
a large common direction that otherwise makes every tile look alike. The mean is a running one, kept exactly: the index
stores the sum of all tiles (float64) and their count, so adding or removing a slide updates
it without touching the other slides. The re-rank centres on the *current* mean at query time
(cheap: it only touches the candidates). The quantiser codes were computed once, centred on
the mean at training time (``ann.mean``); as the cohort grows that mean drifts a little, which
only blurs the candidate stage, never the final scores. The float16 copy stores
``features - ref_mean`` (the mean of the first slide indexed), so float16 rounding is relative
to the centred magnitude, not to the large common offset.

**Incremental.** One slide at a time, by any process (cluster workers included): each
operation takes a file lock (``filelock``) on the index folder, writes the slide's own files
(float16 features, coordinates, quantiser codes) and then atomically replaces the manifest
``index.json``, the single commit point. Nothing of the other slides is rewritten: adding a
slide encodes only its tiles; removing one deletes its files and subtracts its sum. The
quantisers are trained once, on the first ``train_min`` tiles (a one-off of seconds) or by
``gpfm index build``; when the cohort has grown 10x past its training sample,
:attr:`CohortIndex.retrain_advised` says so (``gpfm index build`` retrains).

**Slides.** One entry per feature file, named to users by the slide_id the cohort table
beside the features gives it (``cohort.csv``, :mod:`gpfm_core.cohort.table`), its name or
file stem, or its content id; a name of several slides is refused with the candidates
(:meth:`CohortIndex.slide`). Byte-identical slides under several slide_ids (same tiles and
features) share one set of tiles (one ``num``): indexed once, their hits name every slide_id.

**Failure.** The manifest is the only commit point: a build or add that raises deletes what
it wrote, so the previous index stays as it was, or no index folder is left at all.

On-disk layout of an index folder::

    index.json                       manifest (slides, group, running sum, training)
    index.lock                       the lock file
    ivfpq.<train_id>.faiss           trained, empty IVF-PQ (coarse centroids + PQ codebooks)
    slides/<num>.f16.npy             (N, D) float16  features - ref_mean
    slides/<num>.coords.npy          (N, 2) int64    level-0 (x, y) of each tile
    slides/<num>.<train_id>.codes.npy (N, c) uint8   FAISS standalone codes (list + PQ code)

**Why FAISS and not usearch** (``benchmarks/bench_index.py --compare-usearch 100000``: 100,000
clustered 1024-d tiles, one thread each, re-rank of 256, on the shared 2-core machine at load
average ~6): FAISS ``IVF256,PQ64`` trained and encoded them in 14.8 CPU-s, usearch's HNSW with
int8 vectors (connectivity 16) inserted them in 49.7 CPU-s (~10 CPU-s per 20,000-tile slide);
recall@10 0.999 and 1.000, median query 0.9 and 1.6 ms. The deciding points: memory, 72 bytes
per tile for FAISS (codes + ids) against ~1.5 KB for usearch (152 MB here; 1.5 GB at a million
tiles, ~30 GB at 20 million); and incremental persistence, where the IVF codes of a slide do
not depend on the others (FAISS's standalone codes, ``sa_encode`` / ``add_sa_codes``) and live
in the slide's own file, whereas an HNSW graph changes globally with each insertion, must be
saved whole, and only tombstones removed entries.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core._atomic import atomic_path, write_atomic
from gpfm_core.analysis.similarity import center_features
from gpfm_core.cohort.files import (
    FEATURE_SUFFIX,
    FeatureFilesError,
    FeatureGroup,
    PathLike,
    find_feature_files,
    group_files,
)
from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

FORMAT = "gpfm-cohort-index"
VERSION = 2  # 2: entries keyed by feature file; byte-identical slides share one num
MANIFEST = "index.json"
LOCK = "index.lock"
SLIDES = "slides"
#: Default folder name of a cohort's index, inside the cohort folder.
INDEX_DIRNAME = "gpfm_index"
#: Tiles below which the candidate stage is an exact flat search (no quantiser to train).
DEFAULT_TRAIN_MIN = 50_000
#: Grow this many times past the training sample and :attr:`CohortIndex.retrain_advised` is set.
RETRAIN_FACTOR = 10
#: A FAISS id is ``(slide num << ROW_BITS) | tile row``.
ROW_BITS = 32
_EPS = 1e-12
_CHUNK = 8192  # tiles per encoding step: bounds the float32 temporaries to ~32 MB at 1024-d


class CohortIndexError(GpfmError):
    """The index is missing, damaged, or asked for something it does not hold."""


def _faiss() -> Any:
    """Import FAISS, running it on ``GPFM_FAISS_THREADS`` OpenMP threads (default 1).

    One thread by default: on a shared 2-core machine FAISS's OpenMP threads spin-wait for
    each other, and two threads trained a small IVF-PQ 5x slower in wall time (16.6 s vs
    2.9 s, measured at load average 10) than one. A single query uses one thread anyway.
    """
    import faiss

    global _FAISS_READY
    if not _FAISS_READY:
        faiss.omp_set_num_threads(max(1, int(os.environ.get("GPFM_FAISS_THREADS", "1"))))
        _FAISS_READY = True
    return faiss


_FAISS_READY = False

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class IndexedSlide:
    """One slide held by the index.

    Attributes
    ----------
    num : int
        Its number in the index (never reused); FAISS ids are ``num << 32 | row``.
    slide_id, name : str
        The slide's content id (``slide_id`` attribute, else the file stem) and its name
        (``slide_name`` attribute, else the file stem).
    file : Path
        The feature file it was read from: the key of the entry (one entry per file).
    n_tiles : int
        Tiles (rows) it holds.
    content_hash : str
        blake2b of its float32 features: a re-embedded slide is replaced, an unchanged one skipped.
    tile_size_level0 : int
        Tile side in level-0 px (0 when unknown), to find the tile under a point.
    slide_path : str
        The slide file recorded in the feature file ("" when unknown), for thumbnails.
    size, mtime_ns : int
        Of the feature file when read: an unchanged file is skipped without reading it.
    cohort_slide_id : str
        The slide's ``slide_id`` in the cohort table beside its feature file (the manifest's
        name, e.g. ``case-001``; :mod:`gpfm_core.cohort.table`), read when the index is
        loaded; "" when no table names the file. Not stored in the manifest: the table is
        the source.

    Byte-identical slides (same tiles, same features) under several slide_ids are one set
    of tiles in the index: their entries share ``num``, and a hit names every one of them.
    """

    num: int
    slide_id: str
    name: str
    file: Path
    n_tiles: int
    content_hash: str
    tile_size_level0: int = 0
    slide_path: str = ""
    size: int = 0
    mtime_ns: int = 0
    cohort_slide_id: str = ""

    @property
    def label(self) -> str:
        """How the slide is named to a user: its cohort slide_id, else its name."""
        return self.cohort_slide_id or self.name

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["file"] = str(self.file)
        d.pop("cohort_slide_id")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IndexedSlide:
        return cls(**{**d, "file": Path(d["file"])})


@dataclass(frozen=True)
class CohortHit:
    """One tile found by :meth:`CohortIndex.search`.

    Attributes
    ----------
    slide_id, slide_name : str
        The slide it belongs to.
    file : Path
        That slide's feature file.
    slide_path : str
        The slide image recorded in the feature file ("" when unknown).
    row : int
        The tile's row in the feature file.
    x, y : int
        Level-0 top-left corner of the tile.
    score : float
        Cosine similarity of the centred features, in [-1, 1].
    tile_size_level0 : int
        The tile's side in level-0 px (0 when unknown), e.g. to read its thumbnail.
    cohort_slide_ids : tuple of str
        The slide_ids of the cohort table the tile belongs to: one, or several when
        byte-identical slides were embedded under several slide_ids (indexed once); () when
        no cohort table names the feature file.
    """

    slide_id: str
    slide_name: str
    file: Path
    slide_path: str
    row: int
    x: int
    y: int
    score: float
    tile_size_level0: int = 0
    cohort_slide_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexUpdate:
    """What :func:`build_index`, :func:`add_to_index` or :func:`remove_from_index` did.

    ``notes`` holds one line per feature file indexed as a duplicate of another (the same
    tiles and features: byte-identical slides under two slide_ids), to show the user.
    """

    index_dir: Path
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_slides: int = 0
    n_tiles: int = 0
    trained: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class _Ann:
    """The trained quantisers: which file, which parameters, which centre the codes used."""

    train_id: str
    nlist: int
    pq_m: int
    n_train: int
    nprobe: int
    mean: np.ndarray  # (D,) float32 centre of the encoded vectors

    @property
    def file(self) -> str:
        return f"ivfpq.{self.train_id}.faiss"


@dataclass
class _State:
    """The manifest, in memory."""

    group: FeatureGroup
    dim: int
    train_min: int
    ref_mean: np.ndarray | None  # (D,) float32, subtracted before the float16 copy
    total: np.ndarray  # (D,) float64 sum of the stored (ref-centred) float16 rows
    n_tiles: int = 0  # distinct tiles: byte-identical slides count once
    next_num: int = 1
    slides: dict[str, IndexedSlide] = field(default_factory=dict)  # str(feature file) -> entry
    ann: _Ann | None = None

    def mean(self) -> np.ndarray:
        """(D,) float32 current cohort mean (zeros when empty)."""
        if self.ref_mean is None or self.n_tiles == 0:
            return np.zeros(self.dim, np.float32)
        return (self.ref_mean.astype(np.float64) + self.total / self.n_tiles).astype(np.float32)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unb64(s: str, dtype: Any) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).copy()


def _state_to_json(st: _State, index_dir: Path) -> str:
    def rel(p: Path) -> str:
        # files inside the cohort folder are stored relative to the index, so the folder can move
        try:
            return os.path.relpath(p, index_dir) if p.is_relative_to(index_dir.parent) else str(p)
        except ValueError:
            return str(p)

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "group": st.group.to_dict(),
        "dim": st.dim,
        "train_min": st.train_min,
        "n_tiles": st.n_tiles,
        "next_num": st.next_num,
        "ref_mean": None if st.ref_mean is None else _b64(st.ref_mean.astype(np.float32)),
        "total": _b64(st.total.astype(np.float64)),
        "ann": None
        if st.ann is None
        else {
            "kind": "ivfpq",
            "train_id": st.ann.train_id,
            "nlist": st.ann.nlist,
            "pq_m": st.ann.pq_m,
            "n_train": st.ann.n_train,
            "nprobe": st.ann.nprobe,
            "mean": _b64(st.ann.mean.astype(np.float32)),
        },
        "slides": [{**s.to_json(), "file": rel(s.file)} for s in st.slides.values()],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(doc, indent=1)


def _state_from_json(text: str, index_dir: Path) -> _State:
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise CohortIndexError(f"{index_dir} is not a gpfm cohort index")
        if int(doc.get("version", 0)) > VERSION:
            raise CohortIndexError(
                f"{index_dir} was written by a newer gpfm (index version {doc['version']}); "
                "upgrade gpfm or rebuild the index"
            )
        ann = doc.get("ann")
        slides = {}
        for s in doc["slides"]:
            rec = IndexedSlide.from_json(s)
            if not rec.file.is_absolute():
                rec = replace(rec, file=Path(os.path.normpath(index_dir / rec.file)))
            slides[str(rec.file)] = rec
        return _State(
            group=FeatureGroup(**doc["group"]),
            dim=int(doc["dim"]),
            train_min=int(doc["train_min"]),
            ref_mean=None if doc["ref_mean"] is None else _unb64(doc["ref_mean"], np.float32),
            total=_unb64(doc["total"], np.float64),
            n_tiles=int(doc["n_tiles"]),
            next_num=int(doc["next_num"]),
            slides=slides,
            ann=None
            if ann is None
            else _Ann(
                ann["train_id"],
                int(ann["nlist"]),
                int(ann["pq_m"]),
                int(ann["n_train"]),
                int(ann["nprobe"]),
                _unb64(ann["mean"], np.float32),
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, GpfmError):
            raise
        raise CohortIndexError(
            f"{index_dir / MANIFEST} is damaged ({type(exc).__name__}: {exc}); "
            "rebuild it with gpfm index build"
        ) from None


# --------------------------------------------------------------------------- files of the index


def feature_sets(folder: PathLike) -> list[Path]:
    """The feature folders of a ``gpfm embed`` (or TRIDENT) output folder.

    ``gpfm embed --out COHORT`` writes one folder per encoder and tiling,
    ``COHORT/<tiling>/features_<encoder>-<hash8>/`` (:func:`gpfm_core.embed.layout.features_dir`);
    each is a *feature set*, whose features can share one index.

    Parameters
    ----------
    folder
        Any folder.

    Returns
    -------
    list of Path
        The ``*/features_*`` folders under ``folder`` that hold ``.h5`` files, sorted; empty
        when ``folder`` is itself a feature folder (``features_*``) or has no such layout.
    """
    root = Path(folder)
    if not root.is_dir() or root.name.startswith("features_"):
        return []
    return sorted(
        p for p in root.glob("*/features_*") if p.is_dir() and any(p.glob(f"*{FEATURE_SUFFIX}"))
    )


def index_dir_for(feature_file: PathLike) -> Path:
    """The index a feature file written by ``gpfm embed`` belongs to: ``<its folder>/gpfm_index``.

    One index per feature set (encoder, weights and tiling): the folder ``gpfm embed``
    wrote the file into holds exactly one set.
    """
    return Path(os.path.abspath(feature_file)).parent / INDEX_DIRNAME


def default_index_dir(folder: PathLike) -> Path:
    """Where the index of a folder of feature files lives (where build / add create it).

    * a ``gpfm embed`` output folder holding one feature set: ``<set>/gpfm_index``
      (:func:`feature_sets`; the same place :func:`index_dir_for` gives its files);
    * any other folder (a feature folder itself, a folder of ``.h5`` files):
      ``<folder>/gpfm_index``.

    Raises
    ------
    CohortIndexError
        The folder holds several feature sets (one index each): the message names them.
    """
    sets = feature_sets(folder)
    if len(sets) > 1:
        raise CohortIndexError(_several(Path(folder), sets, "feature sets"))
    return (sets[0] if sets else Path(folder)) / INDEX_DIRNAME


def index_group(index_dir: PathLike) -> FeatureGroup:
    """The encoder, weights and tiling an index holds (read from its manifest, nothing loaded)."""
    p = Path(index_dir) / MANIFEST
    try:
        return FeatureGroup(**json.loads(p.read_text(encoding="utf-8"))["group"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CohortIndexError(
            f"{p} is missing or damaged ({type(exc).__name__}); rebuild it with gpfm index build"
        ) from None


def find_index(folder: PathLike, *, group: FeatureGroup | None = None) -> Path:
    """The existing index of a folder: the folder itself, ``<folder>/gpfm_index``, or the
    ``gpfm_index`` of one of its feature sets (:func:`feature_sets`).

    Parameters
    ----------
    folder
        An index folder, a feature folder, or a ``gpfm embed`` output folder.
    group
        Pick the index of this encoder, weights and tiling (e.g. the open slide's); without
        it the folder must hold exactly one index.

    Returns
    -------
    Path
        The index folder.

    Raises
    ------
    CohortIndexError
        No index there; none of ``group``; several and no ``group`` to choose (the message
        names each with its encoder and tiling).
    """
    root = Path(folder)
    if (root / MANIFEST).is_file():
        found = [root]
    else:
        dirs = [root / INDEX_DIRNAME, *(s / INDEX_DIRNAME for s in feature_sets(root))]
        found = [d for d in dirs if (d / MANIFEST).is_file()]
    if not found:
        raise CohortIndexError(
            f"no cohort index in {root}: make one with gpfm index build {root} "
            "(gpfm embed makes it for a cohort)"
        )
    if group is not None:
        groups = {d: index_group(d) for d in found}
        match = [d for d in found if groups[d] == group]
        if not match:
            have = "; ".join(g.describe() for g in groups.values())
            raise CohortIndexError(
                f"{root} has no index of {group.describe()} (it has {have}): embed the slide "
                "with the cohort's encoder and tiling, or pick another cohort"
            )
        found = match
    if len(found) > 1:
        raise CohortIndexError(_several(root, [d.parent for d in found], "indexes"))
    return found[0]


def _several(root: Path, sets: Sequence[Path], what: str) -> str:
    """One line naming the feature sets of ``root`` and how to pick one."""
    parts = []
    for s in sets:
        rel = s.relative_to(root).as_posix() if s.is_relative_to(root) else str(s)
        parts.append(rel or ".")
    return (
        f"{root} holds {len(sets)} {what} ({', '.join(parts)}), one index each: give one of "
        f"those folders instead (e.g. {root / parts[0]}) or --index DIR"
    )


def _f16_path(index_dir: Path, num: int) -> Path:
    return index_dir / SLIDES / f"{num:07d}.f16.npy"


def _coords_path(index_dir: Path, num: int) -> Path:
    return index_dir / SLIDES / f"{num:07d}.coords.npy"


def _codes_path(index_dir: Path, num: int, train_id: str) -> Path:
    return index_dir / SLIDES / f"{num:07d}.{train_id}.codes.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, parents=True) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CohortIndexError(
            f"index file {path} is missing or damaged ({type(exc).__name__}); "
            "rebuild the index with gpfm index build"
        ) from None


class _RowFile:
    """Rows of one slide's float16 ``.npy``, read with ``pread``: nothing stays mapped.

    Memory-mapping the copy would map the kernel's fault-around window (64 KB) per row read,
    so RSS grew by ~1.6 GB over 200 queries of a million-tile index. ``pread`` reads the
    same bytes through the page cache without mapping them into the process.
    """

    def __init__(self, path: Path, n: int, dim: int) -> None:
        self.path = path
        self.n, self.dim = n, dim
        self.row_bytes = 2 * dim
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(fh)
                self.offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise CohortIndexError(
                f"index file {path} is missing or damaged ({type(exc).__name__}); "
                "rebuild the index with gpfm index build"
            ) from None
        if shape != (n, dim) or fortran or dtype != np.float16:
            raise CohortIndexError(
                f"index file {path} does not match its manifest entry; "
                "rebuild the index with gpfm index build"
            )

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """(m, D) float16 rows ``rows`` (sorted ascending; runs of rows are read at once)."""
        out = np.empty((len(rows), self.dim), np.float16)
        if not len(rows):
            return out
        fd = os.open(self.path, os.O_RDONLY)
        try:
            # split into runs of consecutive rows: one pread per run
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            start = 0
            for end in [*breaks.tolist(), len(rows)]:
                first, count = int(rows[start]), end - start
                buf = os.pread(fd, count * self.row_bytes, self.offset + first * self.row_bytes)
                out[start:end] = np.frombuffer(buf, np.float16).reshape(count, self.dim)
                start = end
        finally:
            os.close(fd)
        return out


@contextlib.contextmanager
def _locked(index_dir: Path, *, create: bool = False) -> Iterator[None]:
    """Hold the index's file lock (waits for other processes)."""
    from filelock import FileLock

    if create:
        index_dir.mkdir(parents=True, exist_ok=True)
    elif not (index_dir / MANIFEST).is_file():
        raise CohortIndexError(
            f"{index_dir} holds no cohort index; create it with gpfm index build (or add)"
        )
    with FileLock(str(index_dir / LOCK)):
        yield


def _read_state(index_dir: Path) -> _State | None:
    p = index_dir / MANIFEST
    if not p.is_file():
        return None
    return _state_from_json(p.read_text(encoding="utf-8"), index_dir)


_OWN_FILE = re.compile(r"^(\d{7})\.(?:f16|coords|([0-9a-f]+)\.codes)\.npy$")


def _cleanup(index_dir: Path, st: _State | None) -> None:
    """Delete the files no committed slide or training refers to (held under the lock).

    ``st`` None: no manifest, so every slide and training file goes.
    """
    live = {s.num for s in st.slides.values()} if st is not None else set()
    train_id = st.ann.train_id if st is not None and st.ann is not None else None
    for p in (index_dir / SLIDES).glob("*") if (index_dir / SLIDES).is_dir() else ():
        m = _OWN_FILE.match(p.name)
        stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")  # a killed writer's
        if m is not None:
            num, tid = int(m.group(1)), m.group(2)
            stale = num not in live or (tid is not None and tid != train_id)
        else:
            stale = stale_tmp
        if stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    for p in index_dir.glob("ivfpq.*.faiss"):
        if st is None or st.ann is None or p.name != st.ann.file:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    for p in index_dir.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _commit(index_dir: Path, st: _State) -> None:
    write_atomic(index_dir / MANIFEST, _state_to_json(st, index_dir))
    _cleanup(index_dir, st)


@contextlib.contextmanager
def _writing(index_dir: Path) -> Iterator[_State | None]:
    """Hold the lock to change the index; yield its committed state (None: no index yet).

    The manifest is the only commit point: when the block raises, every file it wrote
    (slide files, a training) is deleted, and a folder this call created is removed, so a
    failed build or add leaves the index exactly as it was (or no folder at all).
    """
    created = not index_dir.exists()
    failed = False
    try:
        with _locked(index_dir, create=True):
            old = _read_state(index_dir)
            try:
                yield old
            except BaseException:
                failed = True
                _cleanup(index_dir, _read_state(index_dir))  # the committed one: unchanged
                raise
    finally:
        if failed and created and not (index_dir / MANIFEST).exists():
            for p in (index_dir / SLIDES, index_dir / LOCK, index_dir):
                with contextlib.suppress(OSError):  # only what is empty / ours
                    p.rmdir() if p.is_dir() else p.unlink()


# --------------------------------------------------------------------------- writing slides


def _content_hash(features: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(features.shape).encode())
    h.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return h.hexdigest()


def _stored_sum(f16: np.ndarray) -> np.ndarray:
    """(D,) float64 sum of stored rows; the same call at add and at remove, so they cancel."""
    if f16.shape[0] == 0:
        return np.zeros(f16.shape[1], np.float64)
    return np.add.reduce(f16, axis=0, dtype=np.float64)


def _ingest(index_dir: Path, st: _State, path: Path, emb: Any) -> IndexedSlide:
    """Write one slide's float16 features and coordinates; update the running sum."""
    feats = emb.features
    if feats.ndim != 2 or feats.shape[1] != st.dim:
        raise CohortIndexError(
            f"{path.name}: features are {feats.shape[1] if feats.ndim == 2 else feats.shape}-d "
            f"but the index holds {st.dim}-d ones; index it with its own encoder's files"
        )
    if feats.size and not np.isfinite(feats).all():
        raise CohortIndexError(f"{path.name}: features contain NaN or inf; re-embed the slide")
    if st.ref_mean is None and len(feats):
        st.ref_mean = feats.mean(axis=0, dtype=np.float64).astype(np.float32)
    ref = st.ref_mean if st.ref_mean is not None else np.zeros(st.dim, np.float32)
    f16 = (feats - ref).astype(np.float16)
    if f16.size and not np.isfinite(f16).all():
        raise CohortIndexError(
            f"{path.name}: features exceed the float16 range (|x| > 65504); "
            "they cannot be indexed — check the encoder's output scale"
        )
    num = st.next_num
    st.next_num += 1
    _save_npy(_f16_path(index_dir, num), f16)
    _save_npy(_coords_path(index_dir, num), np.ascontiguousarray(emb.coords, dtype=np.int64))
    st.total = st.total + _stored_sum(f16)
    st.n_tiles += len(feats)
    return _record(path, emb, num, _content_hash(feats))


def _record(path: Path, emb: Any, num: int, content_hash: str) -> IndexedSlide:
    """The manifest entry of feature file ``path`` whose tiles are stored under ``num``."""
    stat = path.stat()
    attrs = emb.attrs
    return IndexedSlide(
        num=num,
        slide_id=str(attrs.get("slide_id") or path.stem),
        name=str(attrs.get("slide_name") or path.stem),
        file=path,
        n_tiles=len(emb.features),
        content_hash=content_hash,
        tile_size_level0=int(attrs.get("tile_size_level0") or attrs.get("patch_size_level0") or 0),
        slide_path=str(attrs.get("slide_path") or ""),
        size=int(stat.st_size),
        mtime_ns=int(stat.st_mtime_ns),
    )


def _twin_of(index_dir: Path, st: _State, content_hash: str, emb: Any) -> IndexedSlide | None:
    """The indexed slide with the same tiles and features as ``emb`` (a byte-identical
    slide embedded under another slide_id), or None. Empty slides are never twins."""
    n = len(emb.features)
    ts = int(emb.attrs.get("tile_size_level0") or emb.attrs.get("patch_size_level0") or 0)
    for rec in st.slides.values():
        if rec.content_hash != content_hash or rec.n_tiles != n or not n:
            continue
        if rec.tile_size_level0 == ts and np.array_equal(
            _load_npy(_coords_path(index_dir, rec.num), mmap=True), emb.coords
        ):
            return rec
    return None


def _drop(index_dir: Path, st: _State, rec: IndexedSlide) -> None:
    """Take one entry out of the manifest, and its tiles out of the running sum unless a
    byte-identical slide still holds them (its files go at commit)."""
    del st.slides[str(rec.file)]
    if any(r.num == rec.num for r in st.slides.values()):
        return
    if rec.n_tiles:
        f16 = _load_npy(_f16_path(index_dir, rec.num), mmap=True)
        st.total = st.total - _stored_sum(f16)
    st.n_tiles -= rec.n_tiles
    if st.n_tiles == 0:  # start afresh: no float rounding carried into the next slides
        st.total = np.zeros(st.dim, np.float64)


# --------------------------------------------------------------------------- quantisers


def _pq_m(dim: int) -> int:
    """PQ sub-quantisers: one per 16 dimensions (64 bytes for 1024-d), dividing ``dim``."""
    target = max(1, dim // 16)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def _nlist(n: int) -> int:
    """Inverted lists: the power of two nearest sqrt(n), in [16, 8192] (1024 for a million)."""
    return int(min(8192, max(16, 2 ** round(math.log2(max(n, 1)) / 2))))


def default_nprobe(nlist: int) -> int:
    """Inverted lists a query visits by default: a 32nd of them, at least 8 (32 of 1024).

    At a million 1024-d tiles, 32 and 64 probes gave the same recall@10 (0.982 with 128
    candidates, ``benchmarks/bench_index.py``): recall is bounded by the PQ codes there, not
    by the lists visited, and 32 costs half the scan.
    """
    return max(8, int(nlist) // 32)


def default_candidates(k: int) -> int:
    """Candidates re-ranked by default for a top-``k`` query: ``max(128, 10 k)``.

    At a million 1024-d tiles: recall@10 0.917 with 64 candidates, 0.982 with 128 and
    0.999 with 256; each candidate is one float16 row read, cold rows costing ~0.1 ms.
    """
    return max(128, 10 * int(k))


def _stored_unit(f16: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Unit rows of ``stored + shift`` (``shift = ref_mean - centre``), float32.

    The stored rows were checked finite when the slide was added: no second check here.
    """
    return center_features(f16, mean=-shift, unit=True, finite=False)[0]


def _sample_rows(index_dir: Path, st: _State, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, D) float16 stored rows drawn uniformly from every slide."""
    recs = [r for r in st.slides.values() if r.n_tiles]
    counts = np.array([r.n_tiles for r in recs])
    pick = np.sort(rng.choice(int(counts.sum()), size=n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for i, rec in enumerate(recs):
        rows = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
        if rows.size:
            out.append(np.asarray(_load_npy(_f16_path(index_dir, rec.num), mmap=True)[rows]))
    return np.concatenate(out)


def _train(
    index_dir: Path, st: _State, *, nlist: int | None, pq_m: int | None, seed: int = 0
) -> tuple[_Ann, faiss.Index]:
    """Train IVF-PQ on a sample of the cohort; writes the empty trained index."""
    faiss = _faiss()

    n = st.n_tiles
    nl = int(nlist or _nlist(n))
    m = int(pq_m or _pq_m(st.dim))
    if st.dim % m:
        raise CohortIndexError(f"pq_m={m} must divide the feature width {st.dim}")
    n_sample = min(n, max(64 * nl, 32_768))
    if n_sample < max(nl, 256):
        raise CohortIndexError(
            f"{n} tiles are too few to train {nl} lists and 256-centroid codebooks; "
            "index more slides first (below train_min the index searches exactly)"
        )
    mean = st.mean()
    x = _stored_unit(
        _sample_rows(index_dir, st, n_sample, np.random.default_rng(seed)), st.ref_mean - mean
    )
    index = faiss.index_factory(st.dim, f"IVF{nl},PQ{m}")
    ivf = faiss.extract_index_ivf(index)
    # polysemous training re-orders codes for Hamming filtering we never use; it costs minutes
    index.do_polysemous_training = False
    ivf.cp.seed = seed
    t0 = time.perf_counter()
    index.train(x)
    log.info("trained IVF%d,PQ%d on %d tiles in %.1f s", nl, m, n_sample, time.perf_counter() - t0)
    ann = _Ann(secrets.token_hex(6), nl, m, n_sample, default_nprobe(nl), mean)
    with atomic_path(index_dir / ann.file) as tmp:
        faiss.write_index(index, str(tmp))
    return ann, index


def _read_trained(index_dir: Path, ann: _Ann) -> faiss.Index:
    faiss = _faiss()

    p = index_dir / ann.file
    if not p.is_file():
        raise CohortIndexError(f"{p} is missing; rebuild the index with gpfm index build")
    return faiss.read_index(str(p))


def _encode(index_dir: Path, st: _State, index: faiss.Index, rec: IndexedSlide) -> None:
    """Write one slide's FAISS standalone codes (coarse list + PQ code per tile)."""
    assert st.ann is not None and st.ref_mean is not None
    f16 = _load_npy(_f16_path(index_dir, rec.num), mmap=True)
    shift = st.ref_mean - st.ann.mean
    codes = np.empty((rec.n_tiles, index.sa_code_size()), np.uint8)
    for a in range(0, rec.n_tiles, _CHUNK):
        codes[a : a + _CHUNK] = index.sa_encode(_stored_unit(f16[a : a + _CHUNK], shift))
    _save_npy(_codes_path(index_dir, rec.num, st.ann.train_id), codes)


def _train_and_encode(
    index_dir: Path, st: _State, *, nlist: int | None = None, pq_m: int | None = None
) -> None:
    st.ann, index = _train(index_dir, st, nlist=nlist, pq_m=pq_m)
    for rec in st.slides.values():
        _encode(index_dir, st, index, rec)


# --------------------------------------------------------------------------- operations


def _check_group(group: FeatureGroup, st: _State | None, example: Path) -> None:
    if st is not None and group != st.group:
        raise FeatureFilesError(
            f"{example.name} holds features from {group.describe()} but the index holds "
            f"{st.group.describe()}; index each encoder's files in their own index"
        )


def _unchanged(rec: IndexedSlide, path: Path) -> bool:
    """Same file, same size and modification time as when indexed: skip without reading."""
    try:
        s = path.stat()
    except FileNotFoundError:
        return False
    return rec.file == path and rec.size == s.st_size and rec.mtime_ns == s.st_mtime_ns


def _apply_adds(
    index_dir: Path,
    st: _State,
    paths: Sequence[Path],
    *,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[str], list[str], list[str], list[IndexedSlide], bool, list[str]]:
    """Add each file to ``st`` (writing its slide files); one entry per feature file.

    A file whose tiles and features equal an indexed slide's (byte-identical slides under
    two slide_ids, both accepted by ``gpfm embed``) gets its own entry sharing that slide's
    tiles: indexed once, and its hits name both. A file that moved (same features, its old
    file gone) keeps its entry.

    Returns added, replaced and skipped names, the records whose tiles were written, whether
    the manifest changed at all (a skipped file that was moved or touched updates its
    entry), and one note per duplicate.
    """
    from gpfm_core.embed.loading import EmbeddingsFileError, load_embeddings

    added: list[str] = []
    replaced: list[str] = []
    skipped: list[str] = []
    new: list[IndexedSlide] = []
    twins: list[tuple[IndexedSlide, IndexedSlide]] = []
    touched = False
    for i, path in enumerate(paths):
        old = st.slides.get(str(path))
        if old is not None and _unchanged(old, path):
            skipped.append(old.name)
        else:
            try:
                emb = load_embeddings(path)
            except EmbeddingsFileError as exc:
                raise FeatureFilesError(str(exc)) from None
            h = _content_hash(emb.features)
            moved = next(
                (
                    r
                    for r in st.slides.values()
                    if old is None and r.content_hash == h and not r.file.exists()
                ),
                None,
            )
            if (old is not None and old.content_hash == h) or moved is not None:
                # same features (file touched, or moved): remember its new place and stat
                prev = old if old is not None else moved
                assert prev is not None
                s = path.stat()
                del st.slides[str(prev.file)]
                st.slides[str(path)] = replace(
                    prev, file=path, size=s.st_size, mtime_ns=s.st_mtime_ns
                )
                skipped.append(prev.name)
                touched = True
            else:
                if old is not None:  # re-embedded: the new features replace the old entry
                    _drop(index_dir, st, old)
                twin = _twin_of(index_dir, st, h, emb)
                if twin is not None:
                    rec = _record(path, emb, twin.num, h)
                    twins.append((rec, twin))
                else:
                    rec = _ingest(index_dir, st, path, emb)
                    new.append(rec)
                st.slides[str(path)] = rec
                (replaced if old is not None else added).append(rec.name)
        if progress is not None:
            progress(i + 1, len(paths))
    return added, replaced, skipped, new, touched, _twin_notes(twins)


def _twin_notes(twins: Sequence[tuple[IndexedSlide, IndexedSlide]]) -> list[str]:
    """One line per duplicate, naming both by their cohort slide_ids where a table has them."""
    if not twins:
        return []
    ids = _table_slide_ids([r.file for pair in twins for r in pair])

    def name(r: IndexedSlide) -> str:
        sid = ids.get(r.file, "")
        return f"{sid} ({r.file.name})" if sid else r.file.name

    return [
        f"{name(a)} has the same tiles and features as {name(b)} (byte-identical slides?): "
        "indexed once, its hits name both"
        for a, b in twins
    ]


def _table_slide_ids(files: Iterable[Path]) -> dict[Path, str]:
    """Feature file -> its ``slide_id`` in the cohort table beside it (the manifest's name).

    :func:`gpfm_core.cohort.table.rows_beside`: files no table names are left out; a
    table that cannot be read is logged and ignored (the index works without names).
    """
    from gpfm_core.cohort.table import rows_beside

    rows = rows_beside(files, on_error=lambda exc: log.warning("slide_ids not read: %s", exc))
    return {p: r.slide_id for p, r in rows.items()}


def _table_stamps(files: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of every cohort table :func:`_table_slide_ids` would read."""
    from gpfm_core.cohort.table import table_folders, table_path

    out = []
    for cand in sorted({c for f in files for c in table_folders(f)}):
        with contextlib.suppress(OSError):
            s = table_path(cand).stat()
            out.append((str(cand), s.st_mtime_ns, s.st_size))
    return tuple(out)


def _without(st: _State, keys: Iterable[str]) -> None:
    """Leave entries out of ``st`` in memory (tiles a remaining twin shares stay counted)."""
    dropped = [st.slides.pop(k) for k in keys if k in st.slides]
    kept = {r.num for r in st.slides.values()}
    st.n_tiles -= sum({r.num: r.n_tiles for r in dropped if r.num not in kept}.values())


def _with_table_ids(st: _State, ids: dict[Path, str] | None = None) -> _State:
    """``st`` with each entry's ``cohort_slide_id`` from the cohort tables (in place)."""
    if ids is None:
        ids = _table_slide_ids(r.file for r in st.slides.values())
    st.slides = {k: replace(r, cohort_slide_id=ids.get(r.file, "")) for k, r in st.slides.items()}
    return st


def build_index(
    sources: PathLike | Iterable[PathLike],
    index_dir: PathLike | None = None,
    *,
    train_min: int = DEFAULT_TRAIN_MIN,
    nlist: int | None = None,
    pq_m: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IndexUpdate:
    """Build (or rebuild, retraining the quantisers) the index of a set of feature files.

    Parameters
    ----------
    sources
        Feature files (``.h5``) or folders searched recursively; all must come from one
        encoder, weights and tiling.
    index_dir
        Where the index lives; default ``<folder>/gpfm_index`` when ``sources`` is one folder.
    train_min
        Below this many tiles the candidate stage is exact (flat); from it on, IVF-PQ.
    nlist, pq_m
        IVF lists (default: the power of two nearest sqrt(N)) and PQ bytes per tile
        (default D / 16).
    progress
        Called as ``progress(files_done, files_total)``.

    Returns
    -------
    IndexUpdate
        ``added`` slide names, ``n_slides`` (feature files), ``n_tiles`` (distinct tiles),
        ``trained``, ``notes`` (byte-identical slides indexed once).

    Raises
    ------
    FeatureFilesError
        A path is missing, no file found, files from several encoders / tilings.
    CohortIndexError
        Features of the wrong width, NaN / inf, or unwritable index folder. A failed build
        changes nothing: the previous index (if any) stays as it was, and a folder the build
        created is removed.
    """
    t0 = time.perf_counter()
    out = (Path(index_dir) if index_dir is not None else _default_for(sources)).resolve()
    files = [p for p in find_feature_files(sources) if not p.is_relative_to(out)]
    group, files = group_files(files)
    dim = _width(files[0])
    with _writing(out) as old:
        st = _State(
            group=group,
            dim=dim,
            train_min=int(train_min),
            ref_mean=None,
            total=np.zeros(dim, np.float64),
            next_num=old.next_num if old is not None else 1,  # new files never overwrite old
        )
        added, *_, notes = _apply_adds(out, st, files, progress=progress)
        trained = st.n_tiles >= st.train_min
        if trained:
            _train_and_encode(out, st, nlist=nlist, pq_m=pq_m)
        _commit(out, st)
    return IndexUpdate(
        out,
        added=added,
        notes=notes,
        n_slides=len(st.slides),
        n_tiles=st.n_tiles,
        trained=trained,
        seconds=time.perf_counter() - t0,
    )


def add_to_index(
    index_dir: PathLike,
    sources: PathLike | Iterable[PathLike],
    *,
    train_min: int = DEFAULT_TRAIN_MIN,
    progress: Callable[[int, int], None] | None = None,
) -> IndexUpdate:
    """Add slides to an index (creating it when missing), encoding only the new tiles.

    Safe to call from several processes at once (cluster workers): each call holds the
    index's file lock while it writes. A file already indexed and unchanged (same size and
    modification time) is skipped without being opened, and an add that changes nothing
    writes nothing; a slide whose features changed (re-embedded) replaces its old entry.

    Parameters
    ----------
    index_dir
        The index folder.
    sources
        Feature files or folders (searched recursively).
    train_min
        Only used when the index is created here (see :func:`build_index`).
    progress
        Called as ``progress(files_done, files_total)``.

    Returns
    -------
    IndexUpdate
        ``added``, ``replaced``, ``skipped`` slide names; ``trained`` is True when this call
        crossed ``train_min`` and trained the quantisers.

    Raises
    ------
    FeatureFilesError, CohortIndexError
        As :func:`build_index`; nothing is changed when one file is refused for its group.
    """
    t0 = time.perf_counter()
    out = Path(index_dir).resolve()
    files = [p for p in find_feature_files(sources) if not p.is_relative_to(out)]
    trained = False
    with _writing(out) as st:
        # files indexed as they are now are skipped before anything is opened, and an add
        # that changes nothing writes nothing (a rerun leaves the index as it was)
        known = _unchanged_files(st, files)
        fresh = [p for p in files if p not in known]
        if fresh:
            group, fresh = group_files(fresh)
            if st is None:
                dim = _width(fresh[0])
                st = _State(group, dim, int(train_min), None, np.zeros(dim, np.float64))
            _check_group(group, st, fresh[0])
            added, replaced, skipped, new, touched, notes = _apply_adds(
                out, st, fresh, progress=progress
            )
        else:
            added, replaced, skipped, new, touched, notes = [], [], [], [], False, []
        skipped = [known[p] for p in files if p in known] + skipped
        assert st is not None  # files is never empty: find_feature_files raises
        if st.ann is None and st.n_tiles >= st.train_min:
            _train_and_encode(out, st)
            trained = True
        elif st.ann is not None and new:
            index = _read_trained(out, st.ann)
            for rec in new:
                _encode(out, st, index, rec)
        if added or replaced or touched or trained:
            _commit(out, st)
    return IndexUpdate(
        out,
        added=added,
        replaced=replaced,
        skipped=skipped,
        notes=notes,
        n_slides=len(st.slides),
        n_tiles=st.n_tiles,
        trained=trained,
        seconds=time.perf_counter() - t0,
    )


def _unchanged_files(st: _State | None, files: Sequence[Path]) -> dict[Path, str]:
    """The files indexed in ``st`` and unchanged since (same size and mtime), by name."""
    if st is None:
        return {}
    by_file = {r.file: r for r in st.slides.values()}
    return {
        p: rec.name for p in files if (rec := by_file.get(p)) is not None and _unchanged(rec, p)
    }


def stale_files(index_dir: PathLike, files: Iterable[PathLike]) -> list[Path]:
    """The ``files`` that an add would change: not indexed, or changed since they were.

    Reads only the manifest and ``stat``s each file (no lock, no feature file opened): a
    finished cohort of 10,000 slides is checked in well under a second.
    """
    paths = [Path(os.path.abspath(f)) for f in files]
    st = _read_state(Path(index_dir).resolve())
    known = _unchanged_files(st, paths)
    return [p for p in paths if p not in known]


class IndexFeeder:
    """Adds finished feature files to their indexes, one slide at a time, as a run goes.

    The hook :func:`gpfm_core.cohort.run_cohort` uses (``index=True``, what ``gpfm embed``
    does for a cohort): call it with each feature file as its slide finishes (in one
    process, never concurrently); each file goes to the index of its feature set,
    :func:`index_dir_for` (``<features folder>/gpfm_index``). Files already indexed as they
    are now cost one ``stat`` and write nothing. An index that fails (disk full, a damaged
    manifest) is reported in :attr:`errors` and left alone for the rest of the run; the
    run itself goes on.

    Attributes
    ----------
    updates : dict of Path to IndexUpdate
        What was done to each index, accumulated over the calls.
    errors : dict of Path to str
        One line per index that failed.
    """

    def __init__(self, *, train_min: int = DEFAULT_TRAIN_MIN) -> None:
        self.train_min = int(train_min)
        self.updates: dict[Path, IndexUpdate] = {}
        self.errors: dict[Path, str] = {}

    def __call__(self, feature_file: PathLike) -> None:
        """Add one finished slide's feature file (the ``on_slide_done`` hook)."""
        self.add([feature_file])

    def add(self, feature_files: Iterable[PathLike]) -> None:
        """Add feature files, each to the index of its folder; one manifest read per index."""
        by_dir: dict[Path, list[Path]] = {}
        for f in feature_files:
            by_dir.setdefault(index_dir_for(f), []).append(Path(os.path.abspath(f)))
        for index_dir, files in by_dir.items():
            if index_dir in self.errors:
                continue
            try:
                todo = stale_files(index_dir, files)
                if todo:
                    res = add_to_index(index_dir, todo, train_min=self.train_min)
                else:
                    res = _summary_of(index_dir, files)
            except GpfmError as exc:
                self._failed(index_dir, str(exc))
            except OSError as exc:  # a full disk, a read-only folder: the run goes on
                self._failed(index_dir, f"{type(exc).__name__}: {exc}")
            else:
                for line in res.notes:  # nobody else shows them during a run
                    log.warning("%s", line)
                self._merge(res)

    def remove(self, feature_files: Iterable[PathLike]) -> None:
        """Remove deleted feature files from the indexes listing them (others: nothing).

        The ``on_removed`` hook of :func:`gpfm_core.cohort.table.update_table`: a slide
        superseded in the cohort table loses its old file, and so its index entry, in
        the same run, so no search returns tiles of a file that is gone.
        """
        by_dir: dict[Path, list[Path]] = {}
        for f in feature_files:
            by_dir.setdefault(index_dir_for(f), []).append(Path(os.path.abspath(f)))
        for index_dir, files in by_dir.items():
            if index_dir in self.errors or not (index_dir / MANIFEST).is_file():
                continue
            try:
                st = _read_state(index_dir.resolve())
                listed = st.slides if st is not None else {}
                todo = [str(f.resolve()) for f in files if str(f.resolve()) in listed]
                if not todo:
                    continue
                res = remove_from_index(index_dir, todo)
            except GpfmError as exc:
                self._failed(index_dir, str(exc))
            except OSError as exc:
                self._failed(index_dir, f"{type(exc).__name__}: {exc}")
            else:
                self._merge(res)

    def _failed(self, index_dir: Path, error: str) -> None:
        line = error.strip().splitlines()[0] if error.strip() else "failed"
        self.errors[index_dir] = line
        log.warning("index %s not updated: %s", index_dir, line)

    def _merge(self, res: IndexUpdate) -> None:
        old = self.updates.get(res.index_dir)
        if old is not None:
            res = replace(
                res,
                added=old.added + res.added,
                replaced=old.replaced + res.replaced,
                skipped=old.skipped + res.skipped,
                removed=old.removed + res.removed,
                notes=old.notes + res.notes,
                trained=old.trained or res.trained,
                seconds=old.seconds + res.seconds,
            )
        self.updates[res.index_dir] = res


def _summary_of(index_dir: Path, files: Sequence[Path]) -> IndexUpdate:
    """An :class:`IndexUpdate` saying ``files`` were skipped, with the index's counts."""
    st = _read_state(index_dir.resolve())
    assert st is not None  # every file was found in it
    names = _unchanged_files(st, files)
    return IndexUpdate(
        index_dir.resolve(),
        skipped=[names[p] for p in files if p in names],
        n_slides=len(st.slides),
        n_tiles=st.n_tiles,
        trained=False,
    )


def remove_from_index(index_dir: PathLike, slides: Iterable[str | PathLike]) -> IndexUpdate:
    """Remove slides without touching the others.

    Each is named as :meth:`CohortIndex.slide` accepts (cohort slide_id, name or file stem,
    content id, feature file); a byte-identical twin of a removed slide keeps its tiles.

    Raises
    ------
    CohortIndexError
        No index there, a slide it does not hold, or a name of several slides (nothing is
        removed then).
    """
    t0 = time.perf_counter()
    out = Path(index_dir).resolve()
    with _locked(out):
        st = _read_state(out)
        assert st is not None
        _with_table_ids(st)
        recs = [_resolve(st, s) for s in slides]
        for rec in {r.file: r for r in recs}.values():
            _drop(out, st, rec)
        _commit(out, st)
    return IndexUpdate(
        out,
        removed=sorted({r.label for r in recs}),
        n_slides=len(st.slides),
        n_tiles=st.n_tiles,
        trained=st.ann is not None,
        seconds=time.perf_counter() - t0,
    )


def _default_for(sources: PathLike | Iterable[PathLike]) -> Path:
    items = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    if len(items) == 1 and Path(items[0]).is_dir():
        return default_index_dir(items[0])
    raise CohortIndexError("give the index folder (--index DIR) when indexing several sources")


def _width(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        shape = f["features"].shape if "features" in f else ()
    if len(shape) not in (2, 3) or shape[-1] < 1:
        raise FeatureFilesError(f"{path} has no (N, D) 'features' dataset; not a feature file")
    return int(shape[-1])


def _resolve(st: _State, ref: str | PathLike, *, same_tiles: bool = False) -> IndexedSlide:
    """The slide named by ``ref``: its feature file, its cohort slide_id (the cohort table's),
    its name or file stem or file name, or its content id.

    Parameters
    ----------
    st
        The manifest, with ``cohort_slide_id`` filled (:func:`_with_table_ids`).
    ref
        The name.
    same_tiles
        Accept a name of several entries that share one set of tiles (byte-identical
        slides): the first is returned. For reading tiles, not for removing.

    Raises
    ------
    CohortIndexError
        No slide so named, or several (the message lists them with their slide_ids and
        files, and says how to pick one).
    """
    key = str(ref)
    p = Path(key)
    if key in st.slides:
        return st.slides[key]
    if p.suffix == FEATURE_SUFFIX:  # also a file deleted since (to remove its entry)
        hit = st.slides.get(str(p.resolve()))
        if hit is not None:
            return hit
    found = [
        r
        for r in st.slides.values()
        if key in (r.cohort_slide_id, r.slide_id, r.name, r.file.stem, r.file.name)
    ]
    if len(found) == 1 or (found and same_tiles and len({r.num for r in found}) == 1):
        return found[0]
    if found:
        listed = "; ".join(
            f"{r.cohort_slide_id or r.slide_id} ({r.file.name}"
            + (f", slide {r.slide_path})" if r.slide_path else ")")
            for r in found[:6]
        )
        more = f"; {len(found) - 6} more" if len(found) > 6 else ""
        raise CohortIndexError(
            f"{key!r} names {len(found)} slides of the index: {listed}{more}; give one by its "
            f"slide_id or its feature file's name or path instead (e.g. {found[0].file.name!r})"
        )
    labels = sorted({r.label for r in st.slides.values()})
    known = ", ".join(labels[:5])
    more = "..." if len(labels) > 5 else ""
    raise CohortIndexError(
        f"the index holds no slide {key!r}; it holds {len(st.slides)} slides ({known}{more}): "
        "name one by its slide_id, file name or content id (gpfm index info lists them)"
    )


# --------------------------------------------------------------------------- the loaded index


class CohortIndex:
    """A loaded cohort index: search it, and keep it current with :meth:`refresh`.

    Open with :meth:`open`. Memory: the quantiser codes (``pq_m`` + 8 bytes per tile, 72 MB
    for a million 1024-d tiles) and the trained centroids; the float16 features and the
    coordinates stay on disk (coordinates memory-mapped, features read row by row with
    ``pread``); only the candidates' rows are read.

    Examples
    --------
    >>> idx = CohortIndex.open("cohort/gpfm_index")                  # doctest: +SKIP
    >>> hits = idx.search_tile("slide-A", 1234, k=10)               # doctest: +SKIP
    >>> hits[0].slide_name, hits[0].x, hits[0].y, hits[0].score     # doctest: +SKIP
    """

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir).resolve()
        self._st: _State | None = None
        self._ann_index: faiss.Index | None = None
        self._f16: dict[int, _RowFile] = {}
        self._coords: dict[int, np.ndarray] = {}
        self._by_num: dict[int, list[IndexedSlide]] = {}
        self._ids: dict[Path, str] = {}  # feature file -> cohort table slide_id
        self._stamps: tuple[tuple[str, int, int], ...] | None = None  # of those tables
        self._listed: frozenset[str] = frozenset()  # the manifest's entries at the last refresh
        self._vanished: frozenset[str] = frozenset()  # of those, files deleted since

    # -- opening and keeping current -------------------------------------------------------

    @classmethod
    def open(cls, index_dir: PathLike) -> CohortIndex:
        """Load the index in ``index_dir``.

        Raises
        ------
        CohortIndexError
            No index there, or a file of it missing or damaged.
        """
        idx = cls(Path(index_dir))
        idx.refresh()
        return idx

    def refresh(self) -> bool:
        """Catch up with slides added or removed since loading (by any process).

        Only the difference is applied: new slides' codes are added, removed slides' ids
        dropped. The slides' cohort slide_ids are re-read when a cohort table beside the
        feature files changed.

        A listed feature file that no longer exists (deleted by hand, or superseded by a
        run that did not keep this index) is left out of this view: not in :attr:`slides`,
        never in a search, its tiles not counted (one warning, when first seen, naming it
        and ``gpfm index remove``, which drops it from the index itself); a ``stat`` per
        slide. Returns True when something changed.
        """
        with _locked(self.index_dir):
            st = _read_state(self.index_dir)
            assert st is not None
            old = self._st
            files = [r.file for r in st.slides.values()]
            stamps = _table_stamps(files)
            if stamps != self._stamps or old is None or set(st.slides) != self._listed:
                self._ids = _table_slide_ids(files)
            self._listed = frozenset(st.slides)
            vanished = frozenset(k for k, r in st.slides.items() if not r.file.is_file())
            if vanished - self._vanished:
                self._warn_vanished(st, vanished - self._vanished)
            renamed = stamps != self._stamps or vanished != self._vanished
            self._vanished = vanished
            self._stamps = stamps
            _with_table_ids(st, self._ids)
            _without(st, self._vanished)
            by_num: dict[int, list[IndexedSlide]] = {}
            for r in st.slides.values():
                by_num.setdefault(r.num, []).append(r)
            if old is not None and _same_ann(old.ann, st.ann) and self._ann_index is not None:
                gone = [n for n in self._by_num if n not in by_num]
                came = [recs[0] for n, recs in by_num.items() if n not in self._by_num]
                for num in gone:
                    self._forget(num)
                for rec in came:
                    self._load_slide(st, rec)
                self._st = st
                self._by_num = by_num
                return (
                    bool(gone or came or renamed)
                    or st.n_tiles != old.n_tiles
                    or set(st.slides) != set(old.slides)
                )
            self._st = st
            self._by_num = by_num
            self._f16.clear()
            self._coords.clear()
            self._ann_index = self._empty_ann(st)
            for recs in by_num.values():
                self._load_slide(st, recs[0])
            return True

    def _warn_vanished(self, st: _State, vanished: frozenset[str]) -> None:
        first = st.slides[min(vanished)]
        warnings.warn(
            f"index {self.index_dir} lists {len(vanished)} feature file(s) that no longer "
            f"exist (e.g. {first.file}): left out of its searches; drop them with "
            f"gpfm index remove {first.file.parent} {first.file}",
            stacklevel=3,
        )

    def _empty_ann(self, st: _State) -> faiss.Index:
        faiss = _faiss()

        if st.ann is not None:
            index = _read_trained(self.index_dir, st.ann)
            faiss.extract_index_ivf(index).nprobe = st.ann.nprobe
            return index
        return faiss.IndexIDMap2(faiss.IndexFlatIP(st.dim))

    def _load_slide(self, st: _State, rec: IndexedSlide) -> None:
        path = _f16_path(self.index_dir, rec.num)
        rows = _RowFile(path, rec.n_tiles, st.dim)
        coords = _load_npy(_coords_path(self.index_dir, rec.num), mmap=True)
        if coords.shape != (rec.n_tiles, 2):
            raise CohortIndexError(
                f"index files of {rec.name} do not match its manifest entry; "
                "rebuild the index with gpfm index build"
            )
        self._f16[rec.num] = rows
        self._coords[rec.num] = coords
        if rec.n_tiles == 0:
            return
        ids = (np.int64(rec.num) << ROW_BITS) + np.arange(rec.n_tiles, dtype=np.int64)
        assert self._ann_index is not None
        if st.ann is not None:
            codes = _load_npy(_codes_path(self.index_dir, rec.num, st.ann.train_id))
            self._ann_index.add_sa_codes(codes, ids)
        else:  # flat stage: unit vectors centred on ref_mean (the stored values themselves)
            f16 = _load_npy(path, mmap=True)
            for a in range(0, rec.n_tiles, _CHUNK):
                self._ann_index.add_with_ids(
                    _stored_unit(f16[a : a + _CHUNK], np.zeros(st.dim, np.float32)),
                    ids[a : a + _CHUNK],
                )
            del f16

    def _forget(self, num: int) -> None:
        faiss = _faiss()

        assert self._ann_index is not None
        self._ann_index.remove_ids(faiss.IDSelectorRange(num << ROW_BITS, (num + 1) << ROW_BITS))
        self._f16.pop(num, None)
        self._coords.pop(num, None)

    # -- changing it ------------------------------------------------------------------------

    def add(self, sources: PathLike | Iterable[PathLike], **kwargs: Any) -> IndexUpdate:
        """:func:`add_to_index` on this index, then :meth:`refresh`."""
        res = add_to_index(self.index_dir, sources, **kwargs)
        self.refresh()
        return res

    def remove(self, slides: Iterable[str | PathLike]) -> IndexUpdate:
        """:func:`remove_from_index` on this index, then :meth:`refresh`."""
        res = remove_from_index(self.index_dir, slides)
        self.refresh()
        return res

    # -- what it holds -----------------------------------------------------------------------

    @property
    def _state(self) -> _State:
        assert self._st is not None
        return self._st

    @property
    def dim(self) -> int:
        """D, the feature width."""
        return self._state.dim

    @property
    def group(self) -> FeatureGroup:
        """Encoder, weights and tiling of every file in the index."""
        return self._state.group

    @property
    def n_tiles(self) -> int:
        """Tiles indexed, over all slides."""
        return self._state.n_tiles

    def __len__(self) -> int:
        return self.n_tiles

    @property
    def slides(self) -> list[IndexedSlide]:
        """The slides (one per feature file), in the order they were added."""
        return list(self._state.slides.values())

    def twins(self, slide: str | PathLike) -> list[IndexedSlide]:
        """The slides sharing ``slide``'s tiles (byte-identical slides), itself first."""
        rec = self.slide(slide)
        return [rec, *(r for r in self._by_num[rec.num] if r is not rec)]

    @property
    def mean(self) -> np.ndarray:
        """(D,) float32 the current cohort mean, the centre of every score."""
        return self._state.mean()

    @property
    def trained(self) -> bool:
        """Whether the candidate stage is IVF-PQ (else exact flat search)."""
        return self._state.ann is not None

    @property
    def params(self) -> dict[str, int]:
        """``nlist``, ``pq_m``, ``n_train``, ``nprobe`` of the trained stage ({} when flat)."""
        a = self._state.ann
        return (
            {}
            if a is None
            else {"nlist": a.nlist, "pq_m": a.pq_m, "n_train": a.n_train, "nprobe": a.nprobe}
        )

    @property
    def retrain_advised(self) -> bool:
        """True when the cohort outgrew its training sample 10x (``gpfm index build`` retrains)."""
        a = self._state.ann
        return a is not None and self.n_tiles > RETRAIN_FACTOR * max(a.n_train, 1)

    def slide(self, ref: str | PathLike) -> IndexedSlide:
        """The slide named by ``ref``.

        Parameters
        ----------
        ref
            Its slide_id in the cohort table beside the feature files (e.g. ``case-001``),
            its name, file stem or file name, its content id, or its feature file's path.

        Raises
        ------
        CohortIndexError
            No slide so named, or a name of several slides with different tiles (two files
            ``S01`` from two sites): the message lists them with their slide_ids and files.
        """
        return _resolve(self._state, ref, same_tiles=True)

    def tile_features(self, slide: str | PathLike, row: int) -> np.ndarray:
        """(D,) float32 features of one indexed tile (from the float16 copy)."""
        rec = self.slide(slide)
        if not 0 <= int(row) < rec.n_tiles:
            raise CohortIndexError(f"tile {row} is outside [0, {rec.n_tiles}) of {rec.name}")
        ref = self._state.ref_mean
        assert ref is not None
        return self._f16[rec.num].rows(np.array([int(row)]))[0].astype(np.float32) + ref

    def tile_at(self, slide: str | PathLike, x: float, y: float) -> int | None:
        """Row of the tile of ``slide`` containing level-0 point (x, y), or None."""
        from gpfm_core.analysis.similarity import query_from_point

        rec = self.slide(slide)
        if rec.tile_size_level0 <= 0 or rec.n_tiles == 0:
            raise CohortIndexError(f"{rec.name}: tile size unknown; query by tile row instead")
        return query_from_point(x, y, np.asarray(self._coords[rec.num]), rec.tile_size_level0)

    # -- searching ----------------------------------------------------------------------------

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        from gpfm_core.analysis._util import as_features

        q = as_features(np.atleast_2d(queries), name="query")  # 2-D, numeric, finite
        if q.shape[1] != self.dim or np.ndim(queries) > 2:
            raise CohortIndexError(
                f"query has shape {np.shape(queries)} but the index holds {self.dim}-d features "
                f"from {self.group.encoder}: query with features of that encoder"
            )
        return q

    def _params(
        self, nprobe: int | None, exclude: Sequence[tuple[int, int]], keep: list[Any]
    ) -> Any:
        """FAISS search parameters: probes, and a selector leaving out the id ranges ``exclude``.

        ``keep`` holds the selector objects: FAISS keeps raw pointers to them.
        """
        faiss = _faiss()

        sel = None
        for lo, hi in exclude:
            r = faiss.IDSelectorRange(int(lo), int(hi))
            sel = r if sel is None else faiss.IDSelectorOr(sel, r)
            keep.extend((r, sel))
        if sel is not None:
            sel = faiss.IDSelectorNot(sel)
            keep.append(sel)
        ann = self._state.ann
        if ann is not None:
            kw: dict[str, Any] = {"nprobe": int(nprobe or ann.nprobe)}
            if sel is not None:
                kw["sel"] = sel
            return faiss.SearchParametersIVF(**kw)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def candidates(
        self,
        query: np.ndarray,
        n: int,
        *,
        nprobe: int | None = None,
        exclude_slides: Iterable[str | PathLike] = (),
        exclude_tiles: Iterable[tuple[str | PathLike, int]] = (),
    ) -> np.ndarray:
        """Stage 1: ids (``num << 32 | row``) of up to ``n`` candidates for one query.

        Parameters
        ----------
        query
            (D,) raw features (not centred).
        n
            How many candidates.
        nprobe
            Inverted lists visited (default: the index's, :func:`default_nprobe`).
        exclude_slides, exclude_tiles
            Slides, and (slide, row) tiles, never returned.

        Returns
        -------
        numpy.ndarray
            (n',) int64 ids, n' <= n, best first by the quantised distance.
        """
        return self._candidates(
            self._check_queries(query), n, nprobe, exclude_slides, exclude_tiles
        )[0]

    def _candidates(
        self,
        q: np.ndarray,
        n: int,
        nprobe: int | None,
        exclude_slides: Iterable[str | PathLike],
        exclude_tiles: Iterable[tuple[str | PathLike, int]],
    ) -> list[np.ndarray]:
        st = self._state
        if st.n_tiles == 0:
            return [np.empty(0, np.int64) for _ in q]
        assert self._ann_index is not None
        exclude = []
        for s in exclude_slides:
            num = self.slide(s).num
            exclude.append((num << ROW_BITS, (num + 1) << ROW_BITS))
        for s, r in exclude_tiles:
            i = (self.slide(s).num << ROW_BITS) | int(r)
            exclude.append((i, i + 1))
        centre = st.ann.mean if st.ann is not None else st.ref_mean
        keep: list[Any] = []
        params = self._params(nprobe, exclude, keep)
        n = max(1, min(int(n), st.n_tiles))
        unit_q = center_features(q, mean=centre, unit=True)[0]
        _, ids = self._ann_index.search(unit_q, n, params=params)
        return [row[row >= 0] for row in ids]

    def rerank(self, query: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2: the exact centred cosine of ``query`` to each candidate; the best ``k``.

        Parameters
        ----------
        query
            (D,) raw features.
        ids
            (n,) candidate ids from :meth:`candidates`.
        k
            How many to keep.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            ids (k',) int64 and scores (k',) float32, best first; ties by id.
        """
        q = self._check_queries(query)[0]
        st = self._state
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return ids, np.empty(0, np.float32)
        mean = st.mean()
        assert st.ref_mean is not None
        shift = st.ref_mean - mean
        qn = center_features(q[None, :], mean=mean, unit=True)[0][0]
        if not np.any(qn):
            raise CohortIndexError("the query equals the cohort mean: it has no direction to match")
        nums = ids >> ROW_BITS
        rows = ids & ((1 << ROW_BITS) - 1)
        scores = np.empty(ids.size, np.float32)
        for num in np.unique(nums):
            sel = np.flatnonzero(nums == num)
            order = np.argsort(rows[sel])  # ascending rows: runs are read at once
            f16 = self._f16[int(num)].rows(rows[sel[order]])
            scores[sel[order]] = _stored_unit(f16, shift) @ qn
        best = np.lexsort((ids, -scores))[: int(k)]
        return ids[best], scores[best]

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        *,
        candidates: int | None = None,
        nprobe: int | None = None,
        exclude_slides: Iterable[str | PathLike] = (),
        exclude_tiles: Iterable[tuple[str | PathLike, int]] = (),
    ) -> list[CohortHit]:
        """The ``k`` tiles of the cohort most similar to ``query`` (centred cosine).

        Parameters
        ----------
        query
            (D,) raw features of a tile (or a mean of tiles) from the index's encoder.
        k
            How many tiles.
        candidates
            Re-ranked candidates (default :func:`default_candidates`: ``max(128, 10 k)``);
            more is slower and surer.
        nprobe
            Inverted lists visited (default: the index's).
        exclude_slides, exclude_tiles
            Slides, and ``(slide, row)`` tiles, left out (e.g. the query's own slide).

        Returns
        -------
        list of CohortHit
            Best first.

        Raises
        ------
        CohortIndexError
            Query of the wrong width, non-finite, equal to the mean; unknown excluded slide.
        """
        q = self._check_queries(query)
        if q.shape[0] != 1:
            raise CohortIndexError(
                f"search takes one (D,) query, got {q.shape[0]}; use search_batch for several"
            )
        return self.search_batch(
            q,
            k,
            candidates=candidates,
            nprobe=nprobe,
            exclude_slides=exclude_slides,
            exclude_tiles=exclude_tiles,
        )[0]

    def search_batch(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        candidates: int | None = None,
        nprobe: int | None = None,
        exclude_slides: Iterable[str | PathLike] = (),
        exclude_tiles: Iterable[tuple[str | PathLike, int]] = (),
    ) -> list[list[CohortHit]]:
        """:meth:`search` for each row of ``queries`` (Q, D); the candidate stage runs once."""
        if isinstance(k, bool) or int(k) < 1:
            raise CohortIndexError(f"k must be a positive integer, not {k!r}")
        q = self._check_queries(queries)
        n = int(candidates) if candidates else default_candidates(int(k))
        cands = self._candidates(
            q, max(n, int(k)), nprobe, list(exclude_slides), list(exclude_tiles)
        )
        return [self._hits(*self.rerank(qi, c, int(k))) for qi, c in zip(q, cands, strict=True)]

    def search_tile(
        self,
        slide: str | PathLike,
        row: int,
        k: int = 10,
        *,
        other_slides_only: bool = False,
        **kwargs: Any,
    ) -> list[CohortHit]:
        """Tiles like tile ``row`` of an indexed ``slide`` (the tile itself left out).

        ``other_slides_only`` leaves out the whole slide: "where else in the cohort?".
        """
        q = self.tile_features(slide, row)
        if other_slides_only:
            return self.search(q, k, exclude_slides=[slide], **kwargs)
        return self.search(q, k, exclude_tiles=[(slide, int(row))], **kwargs)

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[CohortHit]:
        out = []
        for i, s in zip(ids.tolist(), scores.tolist(), strict=True):
            num, row = i >> ROW_BITS, i & ((1 << ROW_BITS) - 1)
            recs = self._by_num[num]
            rec = recs[0]
            x, y = (int(v) for v in self._coords[num][row])
            out.append(
                CohortHit(
                    rec.slide_id,
                    rec.name,
                    rec.file,
                    rec.slide_path,
                    int(row),
                    x,
                    y,
                    float(s),
                    rec.tile_size_level0,
                    tuple(r.cohort_slide_id for r in recs if r.cohort_slide_id),
                )
            )
        return out


def _same_ann(a: _Ann | None, b: _Ann | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and a.train_id == b.train_id
    )
