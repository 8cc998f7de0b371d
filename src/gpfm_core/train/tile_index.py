"""A compiled, memory-mapped index of training tiles, shared by every rank and loader worker.

Tile lists come from the embedding store (the ``coords`` of ``.h5`` files written by
``gpfm tiles --out``, ``gpfm embed``, TRIDENT or CLAM), from GPFM's own JSON
(``{folder: [tile image names]}``, as GPFM's ``PathologyDataset`` reads it:
``pretrain/dinov2/data/datasets/pathology.py``), from slides tiled here, or from folders of
tile images. They are compiled once into one file of columns that every process maps
read-only (the page cache holds one copy per machine):

==================  ==========  ==============================================================
column              dtype       contents
==================  ==========  ==============================================================
``xy``              int32 N×2   level-0 top-left ``(x, y)`` of each tile; ``(-1, -1)`` for an
                                image-file tile
``source_start``    int64 S+1   first tile row of each source (tiles are grouped by source)
``source_size``     int32 S×2   level-0 ``(width, height)`` of every tile of the source (x and
                                y differ for non-square pixels); ``(0, 0)`` for image folders
``path_start``      int64 S+1   offsets of each source's path in ``path_bytes`` (UTF-8)
``path_bytes``      uint8
``name_start``      int64 N+1   only when image-file tiles exist: offsets of each tile's file
``name_bytes``      uint8       name (relative to its source folder) in ``name_bytes``
==================  ==========  ==============================================================

Slide tiles cost 8 bytes each (8 MB per million tiles, 1.5 GB at 190 M); image-file tiles 8
bytes plus their name. File layout: ``MAGIC``, the columns (64-byte aligned), a JSON footer
(columns' dtype / shape / offset, ``n_tiles``, ``fingerprint``, ``meta``), its length
(uint64 little-endian) and ``MAGIC`` again. The file is written through
:func:`gpfm_core._atomic.atomic_path` by whichever process takes its lock first
(:func:`gpfm_core.embed.layout.slide_lock`); the others wait for the lock and map the finished
file (:func:`open_or_build`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from gpfm_core.errors import ConfigError, GpfmError

__all__ = [
    "IndexWriter",
    "TileIndex",
    "TileIndexError",
    "TileList",
    "TileRef",
    "build_index",
    "find_slides",
    "open_or_build",
    "read_gpfm_json",
    "read_tile_list",
]

log = logging.getLogger(__name__)

MAGIC = b"GPFMTIX1"
VERSION = 1
_ALIGN = 64
_TAIL = 8 + len(MAGIC)
_INT32_MAX = np.iinfo(np.int32).max
_CHUNK = 1 << 22  # bytes copied at a time from a spill file


class TileIndexError(GpfmError):
    """A tile index file is missing, truncated or of another format."""


@dataclass(frozen=True)
class TileRef:
    """Where one tile is: a slide region, or an image file.

    Attributes
    ----------
    source : int
        Source (slide or image folder) number in the index.
    path : Path
        The slide, or the tile's image file.
    x, y : int
        Level-0 top-left corner; ``-1`` for an image file.
    size : (int, int)
        Level-0 ``(width, height)`` of the tile; ``(0, 0)`` for an image file.
    """

    source: int
    path: Path
    x: int
    y: int
    size: tuple[int, int]

    @property
    def is_image(self) -> bool:
        return self.x < 0


def _pad(fh: IO[bytes]) -> int:
    pos = fh.tell()
    extra = (-pos) % _ALIGN
    if extra:
        fh.write(b"\0" * extra)
    return pos + extra


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    src.seek(0)
    while chunk := src.read(_CHUNK):
        dst.write(chunk)


class IndexWriter:
    """Stream sources into an index file: tiles go straight to ``fh``, bounded memory.

    Parameters
    ----------
    fh : binary file
        Open for writing at position 0 (a real file or ``io.BytesIO``).
    scratch : folder, optional
        Where the anonymous spill files for image names live (None: ``io.BytesIO``).
    """

    def __init__(self, fh: IO[bytes], *, scratch: Path | None = None) -> None:
        self._fh = fh
        fh.write(MAGIC)
        self._xy_offset = _pad(fh)
        self.n_tiles = 0
        self._source_start = [0]
        self._source_size: list[tuple[int, int]] = []
        self._paths: list[bytes] = []
        self._scratch = scratch
        self._names: IO[bytes] | None = None  # name bytes, spilled
        self._name_end: IO[bytes] | None = None  # int64 end offset per tile, spilled
        self._name_total = 0

    def _spill(self) -> IO[bytes]:
        if self._scratch is None:
            return io.BytesIO()
        return tempfile.TemporaryFile(dir=self._scratch)  # closed in finish()

    def _source(self, path: str | os.PathLike[str], size: tuple[int, int], n: int) -> None:
        self.n_tiles += n
        self._source_start.append(self.n_tiles)
        self._source_size.append((int(size[0]), int(size[1])))
        self._paths.append(os.fsencode(str(path)))

    def _empty_names(self, n: int) -> None:
        if self._name_end is not None and n:
            self._name_end.write(np.full(n, self._name_total, np.int64).tobytes())

    def add_slide(
        self, path: str | os.PathLike[str], coords: np.ndarray, size: tuple[int, int]
    ) -> None:
        """Tiles of one slide: ``coords`` (N, 2) level-0 ``(x, y)``, each ``size`` = (w, h)."""
        xy = np.asarray(coords).reshape(-1, 2)
        if xy.size and (xy.min() < 0 or xy.max() > _INT32_MAX):
            raise TileIndexError(f"{path}: tile coordinates outside [0, 2**31): not a tile list")
        if min(size) < 1:
            raise TileIndexError(f"{path}: tile size {size} level-0 px must be positive")
        self._fh.write(np.ascontiguousarray(xy, dtype="<i4").tobytes())
        self._empty_names(len(xy))
        self._source(path, size, len(xy))

    def add_images(self, folder: str | os.PathLike[str], names: Sequence[str]) -> None:
        """Image-file tiles: ``names`` relative to ``folder`` (each file is one tile)."""
        if self._name_end is None:
            self._names, self._name_end = self._spill(), self._spill()
            self._name_end.write(np.zeros(self.n_tiles, np.int64).tobytes())
        assert self._names is not None
        encoded = [os.fsencode(n) for n in names]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
        self._names.write(b"".join(encoded))
        self._name_end.write((self._name_total + np.cumsum(lengths)).astype("<i8").tobytes())
        self._name_total += int(lengths.sum())
        self._fh.write(np.full((len(encoded), 2), -1, "<i4").tobytes())
        self._source(folder, (0, 0), len(encoded))

    def _column(self, arr: np.ndarray) -> dict[str, Any]:
        off = _pad(self._fh)
        arr = np.ascontiguousarray(arr)
        self._fh.write(arr.tobytes())
        return {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": off}

    def finish(self, *, fingerprint: str = "", meta: Mapping[str, Any] | None = None) -> None:
        """Write the per-source columns and the footer."""
        cols: dict[str, Any] = {
            "xy": {"dtype": "<i4", "shape": [self.n_tiles, 2], "offset": self._xy_offset}
        }
        cols["source_start"] = self._column(np.asarray(self._source_start, "<i8"))
        cols["source_size"] = self._column(np.asarray(self._source_size, "<i4").reshape(-1, 2))
        ends = np.cumsum([len(p) for p in self._paths], dtype=np.int64)
        cols["path_start"] = self._column(np.concatenate([[0], ends]).astype("<i8"))
        cols["path_bytes"] = self._column(np.frombuffer(b"".join(self._paths), np.uint8))
        if self._name_end is not None and self._names is not None:
            off = _pad(self._fh)
            self._fh.write(np.zeros(1, "<i8").tobytes())
            _copy(self._name_end, self._fh)
            cols["name_start"] = {"dtype": "<i8", "shape": [self.n_tiles + 1], "offset": off}
            off = _pad(self._fh)
            _copy(self._names, self._fh)
            cols["name_bytes"] = {"dtype": "|u1", "shape": [self._name_total], "offset": off}
            self._names.close()
            self._name_end.close()
        footer = {
            "format": "gpfm tile index",
            "version": VERSION,
            "n_tiles": self.n_tiles,
            "n_sources": len(self._source_size),
            "columns": cols,
            "fingerprint": fingerprint,
            "meta": dict(meta or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        raw = json.dumps(footer).encode("utf-8")
        self._fh.write(raw)
        self._fh.write(np.uint64(len(raw)).astype("<u8").tobytes())
        self._fh.write(MAGIC)


class TileIndex:
    """A compiled tile index: memory-mapped columns (see the module doc), read-only.

    ``TileIndex.open(path)`` maps a file; ``TileIndex.from_bytes(buf)`` reads one held in
    memory (small sets, tests). Pickling a file-backed index (to a loader worker) sends its
    path only; the worker maps the file again.
    """

    def __init__(
        self,
        footer: dict[str, Any],
        columns: dict[str, np.ndarray],
        *,
        path: Path | None,
        buffer: bytes | None,
    ) -> None:
        self.footer = footer
        self.path = path
        self._buffer = buffer
        self.xy: np.ndarray = columns["xy"]
        self.source_start: np.ndarray = columns["source_start"]
        self.source_size: np.ndarray = columns["source_size"]
        self._path_start: np.ndarray = columns["path_start"]
        self._path_bytes: np.ndarray = columns["path_bytes"]
        self._name_start: np.ndarray | None = columns.get("name_start")
        self._name_bytes: np.ndarray | None = columns.get("name_bytes")
        self._paths: dict[int, Path] = {}

    # -- reading ------------------------------------------------------------------------
    @staticmethod
    def _footer_len(tail: bytes, size: int, where: str) -> int:
        """Length of the JSON footer, from the file's last bytes."""
        if size < len(MAGIC) + _TAIL or tail[-len(MAGIC) :] != MAGIC:
            raise TileIndexError(f"{where} is not a complete gpfm tile index: build it again")
        n = int(np.frombuffer(tail[:8], "<u8")[0])
        if n > size - len(MAGIC) - _TAIL:
            raise TileIndexError(f"{where} is truncated: build it again")
        return n

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TileIndex:
        """Map the index file at ``path``.

        Raises
        ------
        TileIndexError
            Missing, truncated or not a tile index.
        """
        p = Path(path)
        try:
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(len(MAGIC))
                fh.seek(max(0, size - _TAIL))
                n = cls._footer_len(fh.read(_TAIL), size, str(p))
                fh.seek(size - _TAIL - n)
                footer = json.loads(fh.read(n))
        except FileNotFoundError:
            raise TileIndexError(f"tile index {p} does not exist: build it first") from None
        except (OSError, ValueError) as exc:
            raise TileIndexError(f"tile index {p} cannot be read ({exc}): build it again") from None
        if head != MAGIC or footer.get("version") != VERSION:
            raise TileIndexError(f"{p} is not a gpfm tile index of version {VERSION}: rebuild it")
        cols = {}
        for name, c in footer["columns"].items():
            shape = tuple(c["shape"])
            if int(np.prod(shape)) == 0:
                cols[name] = np.zeros(shape, c["dtype"])
            else:
                cols[name] = np.memmap(
                    p, dtype=c["dtype"], mode="r", offset=c["offset"], shape=shape
                )
        return cls(footer, cols, path=p, buffer=None)

    @classmethod
    def from_bytes(cls, buf: bytes) -> TileIndex:
        """An index held in memory (what :class:`IndexWriter` wrote to an ``io.BytesIO``)."""
        n = cls._footer_len(buf[-_TAIL:], len(buf), "index in memory")
        footer = json.loads(buf[len(buf) - _TAIL - n : len(buf) - _TAIL])
        cols = {
            name: np.frombuffer(
                buf, dtype=c["dtype"], count=int(np.prod(c["shape"])), offset=c["offset"]
            ).reshape(c["shape"])
            for name, c in footer["columns"].items()
        }
        return cls(footer, cols, path=None, buffer=buf)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "buffer": self._buffer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = (
            TileIndex.open(state["path"])
            if state["path"] is not None
            else TileIndex.from_bytes(state["buffer"])
        )
        self.__dict__.update(other.__dict__)

    # -- queries ------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.footer["n_tiles"])

    @property
    def n_sources(self) -> int:
        return int(self.footer["n_sources"])

    @property
    def fingerprint(self) -> str:
        return str(self.footer.get("fingerprint", ""))

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.footer.get("meta", {}))

    @property
    def nbytes(self) -> int:
        """Size of the index file (or buffer) in bytes."""
        if self.path is not None:
            return self.path.stat().st_size
        return len(self._buffer or b"")

    def source_of(self, rows: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Source number of each tile row (int64, same shape)."""
        r = np.asarray(rows, dtype=np.int64)
        return np.searchsorted(self.source_start, r, side="right").astype(np.int64) - 1

    def source_path(self, source: int) -> Path:
        """The slide (or image folder) of ``source``."""
        p = self._paths.get(source)
        if p is None:
            a, b = int(self._path_start[source]), int(self._path_start[source + 1])
            p = self._paths[source] = Path(os.fsdecode(self._path_bytes[a:b].tobytes()))
        return p

    def source_paths(self) -> list[Path]:
        return [self.source_path(s) for s in range(self.n_sources)]

    def ref(self, row: int) -> TileRef:
        """Where tile ``row`` is."""
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"tile {row} outside an index of {len(self)} tiles")
        s = int(self.source_of(row))
        x, y = (int(v) for v in self.xy[row])
        path = self.source_path(s)
        if x < 0 and self._name_start is not None and self._name_bytes is not None:
            a, b = int(self._name_start[row]), int(self._name_start[row + 1])
            path = path / os.fsdecode(self._name_bytes[a:b].tobytes())
        w, h = (int(v) for v in self.source_size[s])
        return TileRef(s, path, x, y, (w, h))


# -- inputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileList:
    """The tiles of one slide read from an ``.h5`` tile list.

    Attributes
    ----------
    slide : Path
        The slide the tiles lie on.
    coords : ndarray
        (N, 2) int64 level-0 ``(x, y)``.
    size : (int, int)
        Level-0 ``(width, height)`` of each tile (``tile_size_level0``, ``tile_size_level0_y``).
    tile_mpp : float or None
        µm/px of the tiles as the file records them (gpfm: ``effective_mpp``; TRIDENT:
        10 / ``target_magnification``), None when unknown.
    tile_px : int or None
        Pixels per tile side as recorded (``tile_px`` / ``patch_size``).
    """

    slide: Path
    coords: np.ndarray
    size: tuple[int, int]
    tile_mpp: float | None
    tile_px: int | None


def find_slides(folders: Iterable[str | os.PathLike[str]]) -> dict[str, list[Path]]:
    """Every slide file under ``folders`` (recursively) by file stem."""
    from gpfm_core.slide._formats import SUPPORTED_SUFFIXES

    found: dict[str, list[Path]] = {}
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.slide_dirs entry {folder} is not a folder: fix the path")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if p.suffix.lower() in SUPPORTED_SUFFIXES:
                    found.setdefault(p.stem, []).append(p)
    return found


def _slide_name(path: Path, attrs: Mapping[str, Any]) -> str:
    name = attrs.get("slide_name") or attrs.get("name")
    if isinstance(name, str) and name:
        return name
    stem = path.stem
    return stem[: -len("_patches")] if stem.endswith("_patches") else stem


def read_tile_list(
    path: str | os.PathLike[str], *, slides: Mapping[str, list[Path]] | None = None
) -> TileList:
    """The tiles of one ``.h5`` tile list (gpfm, TRIDENT or CLAM) and the slide they lie on.

    Only ``coords`` and the attributes are read (never ``features``). The tile footprint
    comes from :func:`gpfm_core.embed.geometry.tile_geometry` (gpfm's ``tile_size_level0``,
    TRIDENT's ``patch_size_level0``, CLAM's ``patch_size`` × ``downsample``, else the
    spacing) and, for non-square pixels, ``tile_size_level0_y``. The slide is the file's
    ``slide_path`` attribute when that file exists, else the slide of the same name
    (``slide_name`` / ``name`` attribute, or the file stem without ``_patches``) in ``slides``.

    Raises
    ------
    ConfigError
        Not a readable tile list, tile size unknown, or the slide cannot be found (the
        message names ``data.slide_dirs``).
    """
    import h5py

    from gpfm_core.embed.geometry import _num as _attr_num  # a positive finite number or None
    from gpfm_core.embed.geometry import tile_geometry
    from gpfm_core.embed.loading import EmbeddingsFileError, read_attrs

    p = Path(path)
    try:
        attrs = read_attrs(p)
        with h5py.File(p, "r") as f:
            if "coords" not in f:
                raise ConfigError(f"{p} has no 'coords' dataset: not a tile list")
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
    except (EmbeddingsFileError, OSError) as exc:
        raise ConfigError(f"tile list {p} cannot be read ({exc})") from None
    geom, _ = tile_geometry(coords, attrs, name=p.name)
    if geom.tile_size_level0 is None:
        raise ConfigError(f"{geom.note}")
    if geom.source == "spacing":
        log.warning("%s", geom.note)
    sx = int(geom.tile_size_level0)
    sy = int(_attr_num(attrs, "tile_size_level0_y") or sx)
    slide = None
    recorded = attrs.get("slide_path")
    if isinstance(recorded, str) and recorded and Path(recorded).exists():
        slide = Path(recorded)
    else:
        name = _slide_name(p, attrs)
        hits = (slides or {}).get(name, [])
        if len(hits) > 1:
            raise ConfigError(
                f"slide {name!r} of {p.name} is found twice in data.slide_dirs "
                f"({hits[0]}, {hits[1]}): list only one of those folders"
            )
        if not hits:
            where = f" (recorded at {recorded}, missing)" if recorded else ""
            raise ConfigError(
                f"slide {name!r} of tile list {p.name} not found{where}: add its folder to "
                "data.slide_dirs"
            )
        slide = hits[0]
    mpp = _attr_num(attrs, "effective_mpp")
    if mpp is None and _attr_num(attrs, "target_magnification"):
        mpp = 10.0 / float(_attr_num(attrs, "target_magnification"))  # type: ignore[arg-type]
    px = _attr_num(attrs, "tile_px") or _attr_num(attrs, "patch_size")
    return TileList(slide, coords, (sx, sy), mpp, None if px is None else int(px))


def read_gpfm_json(path: str | os.PathLike[str]) -> list[tuple[Path, list[str]]]:
    """GPFM's training list: ``{folder: [tile image name, ...]}`` -> [(folder, names)].

    The format of GPFM's ``PathologyDataset`` (``pretrain/dinov2/data/datasets/pathology.py``,
    ``get_all_files``): each name is joined to its folder; every file is one tile.

    Raises
    ------
    ConfigError
        Not valid JSON, or not a mapping of folders to lists of names.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tile list {p} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
    ):
        raise ConfigError(
            f"{p} is not GPFM's tile list: expected {{folder: [image name, ...]}} as in "
            "GPFM's exclude_split1_dict.json"
        )
    return [(Path(folder), list(names)) for folder, names in data.items()]


# -- building -----------------------------------------------------------------------------
def build_index(
    path: str | os.PathLike[str] | None,
    fill: Callable[[IndexWriter], None],
    *,
    fingerprint: str = "",
    meta: Mapping[str, Any] | None = None,
) -> TileIndex:
    """Compile an index: ``fill(writer)`` adds the sources; the file is written atomically.

    Parameters
    ----------
    path : path-like or None
        Destination file; None builds the index in memory.
    fill : callable
        Called once with an :class:`IndexWriter`.
    fingerprint : str
        Identifies the inputs (stored; :func:`open_or_build` compares it).
    meta : mapping, optional
        JSON-ready facts stored in the footer.
    """
    from gpfm_core._atomic import atomic_path

    t0 = time.perf_counter()
    if path is None:
        buf = io.BytesIO()
        writer = IndexWriter(buf)
        fill(writer)
        writer.finish(fingerprint=fingerprint, meta=meta)
        return TileIndex.from_bytes(buf.getvalue())
    dest = Path(path)
    with atomic_path(dest, parents=True) as tmp, open(tmp, "wb") as fh:
        writer = IndexWriter(fh, scratch=dest.parent)
        fill(writer)
        writer.finish(fingerprint=fingerprint, meta=meta)
    index = TileIndex.open(dest)
    log.info(
        "tile index %s: %d tiles of %d sources, %.1f MB, built in %.1f s",
        dest,
        len(index),
        index.n_sources,
        index.nbytes / 1e6,
        time.perf_counter() - t0,
    )
    return index


def open_or_build(
    path: str | os.PathLike[str],
    fill: Callable[[IndexWriter], None] | None,
    *,
    fingerprint: str,
    meta: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> TileIndex:
    """The index at ``path``, built first when missing or made from other inputs.

    Every rank (and every run sharing the file) calls this: the first to take the file's
    lock builds it, the others wait for the lock and map the finished file. ``fill`` None
    uses the file as it is (an index built before, inputs not listed).

    Raises
    ------
    TileIndexError
        ``fill`` is None and the file is missing or unreadable.
    """
    from gpfm_core.embed.layout import remove_stale_temps, slide_lock

    dest = Path(path)
    if fill is None:
        return TileIndex.open(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:  # the common case, and the waiting ranks' fast path: no lock needed to read
        existing = TileIndex.open(dest)
        if existing.fingerprint == fingerprint:
            return existing
    except TileIndexError:
        pass
    with slide_lock(dest, timeout=timeout):
        try:
            existing = TileIndex.open(dest)
            if existing.fingerprint == fingerprint:
                return existing  # another process built it while this one waited
            log.warning("tile index %s was built from other inputs: building it again", dest)
        except TileIndexError:
            pass
        remove_stale_temps(dest)
        return build_index(dest, fill, fingerprint=fingerprint, meta=meta)
