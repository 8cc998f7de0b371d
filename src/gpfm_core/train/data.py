"""Training tiles: a compiled tile index (:mod:`gpfm_core.train.tile_index`) read lazily.

``build_dataset`` turns the ``data`` config section into a :class:`TileDataset`: the tile
lists (``.h5`` files of ``gpfm tiles`` / ``gpfm embed`` / TRIDENT / CLAM, GPFM's JSON), the
slides to tile here and the folders of tile images are compiled once into an index file that
every rank and loader worker maps (``data.index``, default ``<run>/tiles.tileindex``; rebuilt
when the inputs change). Each process opens slides lazily through a bounded LRU of handles.
A tile that cannot be read (a corrupt region, a truncated or missing slide) raises
:class:`TileReadError`; :func:`make_batch` replaces it by another tile, counts it and goes on.

The data order is :func:`gpfm_core.train.sampler.sample_indices`: a function of (seed, step,
rank) alone, so resuming, or changing the number of loader workers, replays it exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import ConfigError, GpfmError
from gpfm_core.train.sampler import replacement_index, sample_indices
from gpfm_core.train.tile_index import (
    IndexWriter,
    TileIndex,
    find_slides,
    open_or_build,
    read_gpfm_json,
    read_tile_list,
)

__all__ = [
    "DATA_DEFAULTS",
    "INDEX_NAME",
    "SlideHandles",
    "TileDataset",
    "TileReadError",
    "build_dataset",
    "check_data_config",
    "index_path",
    "make_batch",
    "sample_data_paths",
    "sample_indices",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TILE_LIST_EXTS = (".h5", ".hdf5")
SAMPLE_FILES = ("cmu_small_region.svs", "he_patch_1000.png")
INDEX_NAME = "tiles.tileindex"
#: Another tile is tried this many times for one unreadable tile before the batch fails.
MAX_REPLACEMENTS = 16

#: The ``data`` keys and their defaults (``configs/default.yaml``); callers may pass fewer.
DATA_DEFAULTS: dict[str, Any] = {
    "sources": [],
    "image_folders": [],
    "tile_lists": [],
    "slide_dirs": [],
    "index": None,
    "use_sample_data": True,
    "mpp": 0.5,
    "tile_px": 224,
    "min_tissue": 0.25,
    "assume_mpp": 0.25,
    "cache_in_memory": False,
    "holdout_every": 0,
    "num_workers": 0,
    "max_open_slides": 64,
}


class TileReadError(GpfmError):
    """One tile cannot be read (unreadable region, truncated or missing slide or image)."""


def sample_data_paths() -> list[Path]:
    """The two sample images from ``GPFM_DATA_DIR`` (the default tiny training data)."""
    raw = os.environ.get("GPFM_DATA_DIR")
    if not raw:
        raise ConfigError(
            "data.sources is empty and GPFM_DATA_DIR is not set: set data.sources or GPFM_DATA_DIR"
        )
    paths = [Path(raw) / name for name in SAMPLE_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"sample images {missing} not found: set GPFM_DATA_DIR to the sample data folder"
        )
    return paths


def _expand(paths: Sequence[str], exts: Sequence[str], what: str) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in exts and q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise ConfigError(f"data.{what} entry {raw} does not exist: fix the path")
    return out


def _open(path: Path, assume_mpp: float | None) -> Any:
    from gpfm_core.slide import open_slide

    slide = open_slide(path)
    if slide.info.mpp is None:
        slide.close()
        if assume_mpp is None:
            raise ConfigError(f"{path.name} has no µm/px: set data.assume_mpp")
        slide = open_slide(path, mpp=assume_mpp)
    return slide


# -- the inputs and their fingerprint ------------------------------------------------------
def _inputs(data: dict[str, Any]) -> list[tuple[str, Path]]:
    """(kind, path) of every input, in config order: ``slide``, ``h5``, ``json``, ``images``."""
    from gpfm_core.slide._formats import SUPPORTED_SUFFIXES

    lists = list(data["tile_lists"])
    sources: list[str] = []
    for raw in data["sources"]:  # a tile list named in data.sources is taken as one
        suffix = Path(raw).suffix.lower()
        (lists if suffix in (*TILE_LIST_EXTS, ".json") else sources).append(raw)
    folders = list(data["image_folders"])
    if not sources and not folders and not lists:
        if not data["use_sample_data"]:
            raise ConfigError(
                "no training data: set data.tile_lists, data.sources or data.image_folders"
            )
        sources = [str(p) for p in sample_data_paths()]
    out: list[tuple[str, Path]] = []
    for raw in lists:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in TILE_LIST_EXTS)
            if not found:
                deeper = sorted({str(q.parent) for q in p.rglob("*.h5")})[:2]
                hint = f" (they are in {', '.join(deeper)})" if deeper else ""
                raise ConfigError(
                    f"data.tile_lists folder {p} holds no .h5 tile list{hint}: name the folder "
                    "that holds them (e.g. <out>/<tiling>/patches)"
                )
            out.extend(("h5", q) for q in found)
        elif p.is_file():
            out.append(("json" if p.suffix.lower() == ".json" else "h5", p))
        else:
            raise ConfigError(f"data.tile_lists entry {raw} does not exist: fix the path")
    out.extend(("slide", p) for p in _expand(sources, sorted(SUPPORTED_SUFFIXES), "sources"))
    for raw in folders:
        p = Path(raw).expanduser()
        if not p.is_dir():
            raise ConfigError(f"data.image_folders entry {raw} is not a folder: fix the path")
        out.append(("images", p))
    return out


def _stat(p: Path) -> list[Any]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(inputs: list[tuple[str, Path]], data: dict[str, Any]) -> str:
    """A hash of the inputs (path, size, modification time) and the settings that shape them."""
    h = hashlib.sha256()
    settings = {k: data[k] for k in ("mpp", "tile_px", "min_tissue", "assume_mpp", "slide_dirs")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for kind, p in inputs:
        rows: list[Any] = [kind, str(p.resolve())]
        if kind == "images":
            rows.append(sorted(q.name for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS))
        else:
            rows.append(_stat(p))
        h.update(json.dumps(rows, default=str).encode())
    return h.hexdigest()


def _filler(inputs: list[tuple[str, Path]], data: dict[str, Any]) -> Any:
    """The function that writes every input into an :class:`IndexWriter`."""

    def fill(writer: IndexWriter) -> None:
        from gpfm_core.tiling import make_tile_grid

        slides = find_slides(data["slide_dirs"]) if data["slide_dirs"] else {}
        missing: list[str] = []
        warned: set[Path] = set()
        mpp, tile_px = float(data["mpp"]), int(data["tile_px"])
        for kind, path in inputs:
            if kind == "h5":
                try:
                    tl = read_tile_list(path, slides=slides)
                except ConfigError as exc:
                    if "not found" not in str(exc):
                        raise
                    missing.append(str(exc))
                    continue
                writer.add_slide(tl.slide, tl.coords, tl.size)
                eff = tl.tile_mpp * tl.tile_px / tile_px if tl.tile_mpp and tl.tile_px else mpp
                if abs(eff / mpp - 1) > 0.05 and path.parent not in warned:
                    warned.add(path.parent)
                    log.warning(
                        "%s: %d px tiles at %.3g µm/px are shown at %d px (%.3g µm/px), not at "
                        "data.mpp %.3g",
                        path.name,
                        tl.tile_px,
                        tl.tile_mpp,
                        tile_px,
                        eff,
                        mpp,
                    )
            elif kind == "json":
                for folder, names in read_gpfm_json(path):
                    writer.add_images(folder, names)
            elif kind == "images":
                names = sorted(q.name for q in path.iterdir() if q.suffix.lower() in IMAGE_EXTS)
                writer.add_images(path, names)
            else:
                try:
                    slide = _open(path, data["assume_mpp"])
                except GpfmError as exc:
                    raise ConfigError(f"data source {path.name}: {exc}") from None
                with slide:
                    grid = make_tile_grid(
                        slide, mpp=mpp, tile_px=tile_px, min_tissue=float(data["min_tissue"])
                    )
                writer.add_slide(path.resolve(), grid.coords, grid.tile_size_level0_xy)
                log.info("%s: %d tissue tiles", path.name, len(grid))
        if missing:
            log.warning(
                "%d tile list(s) skipped, their slide not found; first: %s",
                len(missing),
                missing[0],
            )
        if writer.n_tiles == 0:
            why = missing[0] if missing else "lower data.min_tissue or add slides"
            raise ConfigError(f"no training tiles found: {why}")

    return fill


def check_data_config(cfg: dict[str, Any]) -> None:
    """Value checks of the data-path keys (``data``, ``train.snapshot_every``); one-line
    :class:`ConfigError`."""
    d = {**DATA_DEFAULTS, **cfg["data"]}
    for key, low in (("num_workers", 0), ("max_open_slides", 1), ("holdout_every", 0)):
        if not isinstance(d[key], int) or d[key] < low:
            raise ConfigError(f"data.{key} must be an int >= {low}, got {d[key]!r}")
    if d["holdout_every"] == 1:
        raise ConfigError("data.holdout_every must be 0 (off) or >= 2, got 1")
    for key in ("tile_lists", "slide_dirs", "sources", "image_folders"):
        if not isinstance(d[key], list):
            raise ConfigError(f"data.{key} must be a list of paths, got {d[key]!r}")
    snap = cfg.get("train", {}).get("snapshot_every", 0)
    if not isinstance(snap, int) or snap < 0:
        raise ConfigError(f"train.snapshot_every must be an int >= 0 (0: off), got {snap!r}")


def index_path(data: dict[str, Any], out_dir: str | os.PathLike[str] | None) -> Path | None:
    """Where the run's tile index lives: ``data.index``, else ``<out_dir>/tiles.tileindex``."""
    if data.get("index"):
        return Path(str(data["index"])).expanduser()
    return None if out_dir is None else Path(out_dir) / INDEX_NAME


# -- reading -------------------------------------------------------------------------------
class SlideHandles:
    """A bounded LRU of open slides, per process: the least recently used is closed first.

    Handles inherited through ``fork`` belong to the parent and are dropped, never used.

    Parameters
    ----------
    max_open : int
        Most slides kept open at once (>= 1).
    """

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max(1, int(max_open))
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def _own(self) -> None:
        if os.getpid() != self._pid:  # a forked child: the parent's handles are not ours
            self._open = OrderedDict()
            self._pid = os.getpid()

    def get(self, key: int, path: Path) -> Any:
        """The open slide ``key`` (opened from ``path`` when not open).

        Raises
        ------
        SlideError
            The slide cannot be opened.
        """
        from gpfm_core.slide import open_slide

        self._own()
        slide = self._open.pop(key, None)
        if slide is None:
            slide = open_slide(path)
            while len(self._open) >= self.max_open:
                _, old = self._open.popitem(last=False)
                old.close()
        self._open[key] = slide
        return slide

    def discard(self, key: int) -> None:
        """Close and forget slide ``key`` (after a read error: OpenSlide's errors are sticky)."""
        self._own()
        slide = self._open.pop(key, None)
        if slide is not None:
            try:
                slide.close()
            except Exception as exc:  # a handle in OpenSlide's error state may refuse
                log.debug("closing %s failed: %s", key, exc)

    def __len__(self) -> int:
        self._own()
        return len(self._open)

    def close(self) -> None:
        self._own()
        while self._open:
            self.discard(next(iter(self._open)))


class _Rows:
    """Positions of a split -> index rows: every k-th tile is held out (no array)."""

    def __init__(self, n: int, every: int, split: str) -> None:
        self.n, self.k, self.split = n, every, split

    def __len__(self) -> int:
        if self.k <= 0:
            return self.n
        held = self.n // self.k
        return held if self.split == "holdout" else self.n - held

    def __call__(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64)
        k = self.k
        if k <= 0:
            return pos
        if self.split == "holdout":
            return pos * k + (k - 1)
        return (pos // (k - 1)) * k + pos % (k - 1)


class TileDataset:
    """Training tiles of a :class:`~gpfm_core.train.tile_index.TileIndex` (one split of it).

    Parameters
    ----------
    index : TileIndex
        The compiled tiles.
    tile_px : int
        Side of every returned tile.
    holdout_every : int
        ``k > 0``: every k-th tile of the index is held out of ``"train"`` and forms
        ``"holdout"``.
    split : {"train", "holdout"}
    max_open_slides : int
        Size of the per-process LRU of open slides.
    """

    def __init__(
        self,
        index: TileIndex,
        *,
        tile_px: int,
        holdout_every: int = 0,
        split: str = "train",
        max_open_slides: int = 64,
    ) -> None:
        self.index = index
        self.tile_px = int(tile_px)
        self._rows = _Rows(len(index), int(holdout_every or 0), split)
        self._handles = SlideHandles(max_open_slides)
        self._plans: dict[int, tuple[int, tuple[int, int]]] = {}
        self._bad: dict[int, str] = {}  # sources that cannot be opened: reason
        self._cache: np.ndarray | None = None
        self._cache_ok: np.ndarray | None = None
        self._warned: set[int] = set()
        #: Unreadable tiles met by this process (replaced in their batches).
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index rows of split positions."""
        return self._rows(np.asarray(positions, dtype=np.int64))

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 source (slide / image folder) number of each tile of the split."""
        return self.index.source_of(self.rows(np.arange(len(self))))

    @property
    def sources(self) -> list[Path]:
        """Source paths, by source number."""
        return self.index.source_paths()

    def describe(self, i: int) -> str:
        """``slide.svs (x, y)`` or the image path of tile ``i``, for messages."""
        ref = self.index.ref(int(self.rows([i])[0]))
        return str(ref.path) if ref.is_image else f"{ref.path.name} ({ref.x}, {ref.y})"

    def note_skip(self, i: int, exc: Exception) -> None:
        """Count an unreadable tile; log the first of each source as a warning."""
        self.skipped += 1
        source = int(self.index.source_of(int(self.rows([i])[0])))
        if source in self._warned:
            log.debug("skipped: %s", exc)
            return
        self._warned.add(source)
        log.warning("skipped an unreadable tile (others of this source: debug log): %s", exc)

    def _read_image(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
                if img.size != (self.tile_px, self.tile_px):
                    img = img.resize((self.tile_px, self.tile_px), Image.Resampling.BICUBIC)
                return np.array(img, dtype=np.uint8)  # writable (torch.from_numpy)
        except (OSError, ValueError) as exc:
            raise TileReadError(f"tile image {path} cannot be read ({exc})") from None

    def read(self, i: int) -> np.ndarray:
        """Read tile ``i`` from its slide or image file: (tile_px, tile_px, 3) uint8 RGB.

        Raises
        ------
        TileReadError
            The region, slide or image cannot be read.
        """
        from gpfm_core.tiling import read_plan, read_tile

        ref = self.index.ref(int(self.rows([i])[0]))
        if ref.is_image:
            return self._read_image(ref.path)
        if ref.source in self._bad:
            raise TileReadError(self._bad[ref.source])
        try:
            slide = self._handles.get(ref.source, ref.path)
        except (GpfmError, OSError) as exc:
            self._bad[ref.source] = f"slide {ref.path} cannot be opened ({exc})"
            raise TileReadError(self._bad[ref.source]) from None
        try:
            plan = self._plans.get(ref.source)
            if plan is None:
                plan = self._plans[ref.source] = read_plan(slide, ref.size, self.tile_px)
            return read_tile(slide, (ref.x, ref.y), plan[0], plan[1], self.tile_px)
        except (GpfmError, OSError, ValueError) as exc:
            self._handles.discard(ref.source)
            self._plans.pop(ref.source, None)
            raise TileReadError(f"tile {self.describe(i)} cannot be read ({exc})") from None

    def __getitem__(self, i: int) -> np.ndarray:
        """Tile ``i`` as (tile_px, tile_px, 3) uint8 RGB (see :meth:`read`)."""
        if self._cache is not None and self._cache_ok is not None:
            if not self._cache_ok[i]:
                raise TileReadError(f"tile {self.describe(i)} could not be read")
            return self._cache[i]
        return self.read(i)

    def cache(self) -> None:
        """Read every tile into memory (small sets); unreadable tiles are remembered."""
        n = len(self)
        self._cache = np.zeros((n, self.tile_px, self.tile_px, 3), np.uint8)
        self._cache_ok = np.zeros(n, bool)
        for i in range(n):
            try:
                self._cache[i] = self.read(i)
                self._cache_ok[i] = True
            except TileReadError as exc:
                log.warning("%s", exc)
        self.close()

    def tiles(self, indices: Any = None) -> np.ndarray:
        """(B, tile_px, tile_px, 3) uint8 for ``indices`` (all when None)."""
        idx = range(len(self)) if indices is None else indices
        return np.stack([self[int(i)] for i in idx])

    def close(self) -> None:
        """Close open slide handles."""
        self._handles.close()
        self._plans.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = SlideHandles(self._handles.max_open)  # handles never travel
        state["_plans"] = {}
        return state


def build_dataset(
    data: dict[str, Any],
    *,
    split: str = "train",
    index: str | os.PathLike[str] | None = None,
) -> TileDataset:
    """The tiles named by the ``data`` config section, through a compiled tile index.

    Parameters
    ----------
    data : dict
        The ``data`` section (missing keys take :data:`DATA_DEFAULTS`).
    split : {"train", "holdout"}
        ``data.holdout_every = k > 0`` keeps every k-th tile out of ``"train"``; they form
        ``"holdout"`` (the evaluation hook's ``holdout`` task).
    index : path-like, optional
        The index file (see :func:`index_path`); None (and no ``data.index``) compiles the
        index in memory.

    Raises
    ------
    ConfigError
        No source, a missing path, a tile list whose slide cannot be found, no tile at all,
        or ``data.index`` names a missing file while no input is listed.
    """
    data = {**DATA_DEFAULTS, **data}
    if split not in ("train", "holdout"):
        raise ConfigError(f"split must be train or holdout, got {split!r}")
    every = int(data["holdout_every"] or 0)
    if every == 1 or every < 0:
        raise ConfigError(f"data.holdout_every must be 0 (off) or >= 2, got {every}")
    if split == "holdout" and every == 0:
        raise ConfigError("the holdout split needs data.holdout_every >= 2")
    path = Path(index) if index is not None else index_path(data, None)
    prebuilt = (
        path is not None
        and bool(data["index"])
        and not (data["sources"] or data["tile_lists"] or data["image_folders"])
    )
    if prebuilt:  # an index compiled before, inputs not listed: used as it is
        from gpfm_core.train.tile_index import TileIndexError

        try:
            tiles = open_or_build(path, None, fingerprint="")  # type: ignore[arg-type]
        except TileIndexError as exc:
            raise ConfigError(f"data.index: {exc}") from None
    else:
        inputs = _inputs(data)
        fp = _fingerprint(inputs, data)
        meta = {"inputs": len(inputs)}
        if path is None:
            from gpfm_core.train.tile_index import build_index

            tiles = build_index(None, _filler(inputs, data), fingerprint=fp, meta=meta)
        else:
            tiles = open_or_build(path, _filler(inputs, data), fingerprint=fp, meta=meta)
    ds = TileDataset(
        tiles,
        tile_px=int(data["tile_px"]),
        holdout_every=every,
        split=split,
        max_open_slides=int(data["max_open_slides"]),
    )
    if len(ds) == 0:
        raise ConfigError(f"the {split} split has no tiles: lower data.holdout_every or add data")
    if data["cache_in_memory"]:
        ds.cache()
    return ds


def read_or_replace(
    dataset: TileDataset, index: int, *, seed: int, position: int
) -> tuple[np.ndarray, int, int]:
    """Tile ``index``, or when it cannot be read a deterministic replacement.

    Returns
    -------
    (ndarray, int, int)
        The tile, the index actually read, and how many unreadable tiles were skipped.

    Raises
    ------
    GpfmError
        :data:`MAX_REPLACEMENTS` tiles in a row could not be read (the data is broken).
    """
    i, last = int(index), None
    for attempt in range(MAX_REPLACEMENTS + 1):
        try:
            return dataset[i], i, attempt
        except TileReadError as exc:
            last = exc
            dataset.note_skip(i, exc)
            i = replacement_index(len(dataset), seed=seed, position=position, attempt=attempt)
    raise GpfmError(
        f"{MAX_REPLACEMENTS + 1} tiles in a row could not be read (last: {last}); "
        "check the slides of the tile index"
    )


def make_batch(
    dataset: TileDataset,
    augment: Any,
    *,
    seed: int,
    step: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    patch_size: int,
    mask_probability: float,
    mask_ratio: tuple[float, float],
) -> dict[str, Any]:
    """Augmented crops and iBOT masks for micro-step ``step``.

    Returns
    -------
    dict
        ``global`` (2B, 3, G, G) float [0, 1], crop-major (crop 0 of every sample first);
        ``local`` (nL*B, 3, L, L) float or None; ``masks`` (2B, (G/p)^2) bool;
        ``indices`` (B,) int64 dataset indices (replacements included); ``skipped`` int,
        unreadable tiles replaced in this batch.
    """
    import torch

    from gpfm_core.train.masking import sample_masks

    idx = sample_indices(
        len(dataset), seed=seed, step=step, batch_size=batch_size, rank=rank, world_size=world_size
    )
    base = (step * world_size + rank) * batch_size
    crops, used, skipped = [], np.empty_like(idx), 0
    for j, i in enumerate(idx):
        tile, used[j], n_bad = read_or_replace(dataset, int(i), seed=seed, position=base + j)
        skipped += n_bad
        crops.append(augment(tile, (seed, base + j)))
    glob = torch.stack([c["global"][k] for k in range(2) for c in crops])
    n_local = len(crops[0]["local"])
    local = torch.stack([c["local"][k] for k in range(n_local) for c in crops]) if n_local else None
    g = glob.shape[-1] // patch_size
    rng = np.random.default_rng([seed, 104729, step, rank])
    masks = sample_masks(
        rng, glob.shape[0], (g, g), probability=mask_probability, ratio_min_max=mask_ratio
    )
    return {
        "global": glob,
        "local": local,
        "masks": torch.from_numpy(masks),
        "indices": torch.from_numpy(used),
        "skipped": skipped,
    }
