"""Training tiles: tissue tiles streamed from slides through the tiler, or image folders.

``TileDataset`` indexes tiles (slide, level-0 corner) once and reads each when it is asked
for (``cache_in_memory`` reads them all up front, for small sets). ``sample_indices`` maps a
(step, rank) to dataset indices from a per-epoch seeded permutation, so the data order is a
function of the step alone: resuming or changing the number of workers replays it exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import ConfigError, GpfmError

__all__ = ["TileDataset", "build_dataset", "make_batch", "sample_data_paths", "sample_indices"]

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SLIDE_EXTS = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".svslide",
    ".bif",
    ".vms",
    ".vmu",
    ".tif",
    ".tiff",
    ".png",
    ".jpg",
    ".jpeg",
)
SAMPLE_FILES = ("cmu_small_region.svs", "he_patch_1000.png")


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


def _expand(paths: list[str], exts: tuple[str, ...], what: str) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in exts and q.is_file()))
        elif p.is_file():
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


def _tissue_fraction(tile: np.ndarray) -> float:
    """Share of non-background pixels (not near-white, some colour) in an RGB tile."""
    t = tile.astype(np.int16)
    sat = t.max(axis=-1) - t.min(axis=-1)
    return float(((t.min(axis=-1) < 220) & (sat > 15)).mean())


def _grid(slide: Any, mpp: float, tile_px: int, min_tissue: float) -> tuple[np.ndarray, int]:
    """Tissue tile corners (N, 2) int64 and the level-0 read size; via gpfm_core.tiling if present."""
    try:
        from gpfm_core.tiling import make_tile_grid
    except ImportError:  # tiler not installed: a simple level-0 grid with a pixel tissue test
        size0 = max(1, round(tile_px * mpp / slide.mpp[0]))
        w, h = slide.dimensions
        corners = [
            (x, y) for y in range(0, h - size0 + 1, size0) for x in range(0, w - size0 + 1, size0)
        ]
        keep = [
            c
            for c in corners
            if _tissue_fraction(slide.read_region(c, 0, (size0, size0))) >= min_tissue
        ]
        return np.asarray(keep, dtype=np.int64).reshape(-1, 2), size0
    grid = make_tile_grid(slide, mpp=mpp, tile_px=tile_px, min_tissue=min_tissue)
    return np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2), int(grid.tile_size_level0)


@dataclass
class TileDataset:
    """Indexed training tiles.

    Attributes
    ----------
    tile_px : int
        Side of every returned tile.
    refs : list of (source index, x, y)
        Slide tiles (``x, y`` level-0 corners) or image tiles (``x = y = -1``).
    sources : list of Path
        Source files; ``labels`` gives each tile's source index.
    """

    tile_px: int
    refs: list[tuple[int, int, int]]
    sources: list[Path]
    read_sizes: list[int]
    assume_mpp: float | None = None
    _cache: np.ndarray | None = None
    _slides: dict[int, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 index of each tile's source file."""
        return np.asarray([r[0] for r in self.refs], dtype=np.int64)

    def _read(self, i: int) -> np.ndarray:
        from PIL import Image

        src, x, y = self.refs[i]
        if x < 0:
            with Image.open(self.sources[src]) as im:
                img = im.convert("RGB")
        else:
            slide = self._slides.get(src)
            if slide is None:
                slide = self._slides[src] = _open(self.sources[src], self.assume_mpp)
            s = self.read_sizes[src]
            img = Image.fromarray(slide.read_region((x, y), 0, (s, s)))
        if img.size != (self.tile_px, self.tile_px):
            img = img.resize((self.tile_px, self.tile_px), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tile ``i`` as (tile_px, tile_px, 3) uint8 RGB."""
        if self._cache is not None:
            return self._cache[i]
        return self._read(i)

    def cache(self) -> None:
        """Read every tile into memory."""
        self._cache = np.stack([self._read(i) for i in range(len(self))]) if self.refs else None
        self.close()

    def tiles(self, indices: Any = None) -> np.ndarray:
        """(B, tile_px, tile_px, 3) uint8 for ``indices`` (all when None)."""
        idx = range(len(self)) if indices is None else indices
        return np.stack([self[int(i)] for i in idx])

    def close(self) -> None:
        """Close open slide handles."""
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()


def build_dataset(data: dict[str, Any], *, split: str = "train") -> TileDataset:
    """Index the tiles named by the ``data`` config section.

    ``data.holdout_every = k > 0`` keeps every k-th tile out of the ``"train"`` split; they
    form the ``"holdout"`` split (for evaluation).

    Raises
    ------
    ConfigError
        No source, a missing path, or no tissue tile at all.
    """
    sources_cfg = list(data["sources"])
    folders = list(data["image_folders"])
    if not sources_cfg and not folders:
        if not data["use_sample_data"]:
            raise ConfigError("no training data: set data.sources or data.image_folders")
        sources_cfg = [str(p) for p in sample_data_paths()]
    slides = _expand(sources_cfg, SLIDE_EXTS, "sources")
    images = _expand(folders, IMAGE_EXTS, "image_folders")
    refs: list[tuple[int, int, int]] = []
    sources: list[Path] = []
    read_sizes: list[int] = []
    for path in slides:
        try:
            slide = _open(path, data["assume_mpp"])
        except GpfmError as exc:
            raise ConfigError(f"data source {path.name}: {exc}") from None
        with slide:
            coords, size0 = _grid(
                slide, float(data["mpp"]), int(data["tile_px"]), float(data["min_tissue"])
            )
        src = len(sources)
        sources.append(path)
        read_sizes.append(size0)
        refs.extend((src, int(x), int(y)) for x, y in coords)
        log.info("%s: %d tissue tiles", path.name, len(coords))
    for path in images:
        refs.append((len(sources), -1, -1))
        sources.append(path)
        read_sizes.append(0)
    k = int(data.get("holdout_every") or 0)
    if k > 0:
        keep = (lambda i: i % k == k - 1) if split == "holdout" else (lambda i: i % k != k - 1)
        refs = [r for i, r in enumerate(refs) if keep(i)]
    if not refs:
        raise ConfigError(
            "no tissue tiles found in data.sources: lower data.min_tissue or add slides"
        )
    ds = TileDataset(int(data["tile_px"]), refs, sources, read_sizes, data["assume_mpp"])
    if data["cache_in_memory"]:
        ds.cache()
    return ds


def sample_indices(
    n: int, *, seed: int, step: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """Dataset indices for micro-step ``step`` on ``rank``: positions in a per-epoch permutation.

    Returns
    -------
    ndarray
        (batch_size,) int64, and the global sample positions are ``step*world*B + rank*B + i``.
    """
    start = (step * world_size + rank) * batch_size
    pos = np.arange(start, start + batch_size, dtype=np.int64)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(pos // n):
        perm = np.random.default_rng([seed, 7919, int(epoch)]).permutation(n)
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


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
        ``indices`` (B,) int64 dataset indices.
    """
    import torch

    from gpfm_core.train.masking import sample_masks

    idx = sample_indices(
        len(dataset), seed=seed, step=step, batch_size=batch_size, rank=rank, world_size=world_size
    )
    base = (step * world_size + rank) * batch_size
    crops = [augment(dataset[int(i)], (seed, base + j)) for j, i in enumerate(idx)]
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
        "indices": torch.from_numpy(idx),
    }
