"""Per-slide state of the dock: embeddings, caches and results (plain Python, no Qt).

A :class:`SlideSession` holds one embedded slide: its tile table (features, coords, grid
indices), a lazily built similarity index (L2-normalised features, cached), the
``(rows, cols)`` raster of tile indices used for click look-up and for building
tile-resolution layers, and the analysis results (UMAP, clusters, similarity, probe).
:class:`SessionStore` keeps one session per embedded slide so retrieval can search all of
them. Nothing here imports napari or Qt; ``_overlays`` turns sessions into layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

_STRIDE_KEYS = ("stride_level0", "stride", "step_level0")
_TILE_KEYS = ("tile_size_level0", "patch_size_level0", "tile_size")
_MPP_KEYS = ("slide_mpp", "mpp_level0", "level0_mpp")


def _attr(attrs: Mapping[str, Any], keys: tuple[str, ...], default: Any = None) -> Any:
    for key in keys:
        if key in attrs and attrs[key] is not None:
            return attrs[key]
    return default


def _pair(value: Any) -> tuple[float, float]:
    arr = np.asarray(value, dtype=float).ravel()
    if arr.size == 1:
        return float(arr[0]), float(arr[0])
    return float(arr[0]), float(arr[1])


@dataclass
class SlideSession:
    """State of one embedded slide.

    Attributes
    ----------
    key : str
        Identity of the slide in the dock (its slide id, else its path).
    name : str
        Display name (the slide layer name).
    slide_path : Path or None
        Slide file, used to read gallery thumbnails.
    features : numpy.ndarray
        (N, D) float32 tile embeddings.
    coords : numpy.ndarray
        (N, 2) int64 level-0 top-left ``(x, y)`` of each tile.
    grid_rc : numpy.ndarray
        (N, 2) int64 ``(row, col)`` of each tile in the tile grid.
    grid_shape : tuple of int
        ``(rows, cols)`` of the tile grid.
    stride : int
        Grid step in level-0 pixels.
    tile_size : int
        Tile side in level-0 pixels.
    mpp : tuple of float
        Level-0 µm/px ``(x, y)`` of the slide.
    embeddings_path : Path or None
        HDF5 file the embeddings came from.
    encoder, weights_hash : str
        Encoder name and weights hash the features came from ("" when the file does not say).
    tiling : dict
        ``requested_mpp`` (µm/px), ``tile_px`` and ``overlap_px`` of the tile grid (empty when
        unknown). With ``encoder`` and ``weights_hash`` it decides :meth:`comparable`.
    """

    key: str
    name: str
    slide_path: Path | None
    features: np.ndarray
    coords: np.ndarray
    grid_rc: np.ndarray
    grid_shape: tuple[int, int]
    stride: int
    tile_size: int
    mpp: tuple[float, float]
    embeddings_path: Path | None = None
    encoder: str = ""
    weights_hash: str = ""
    tiling: dict[str, Any] = field(default_factory=dict)
    umap: np.ndarray | None = None
    clusters: np.ndarray | None = None
    similarity: np.ndarray | None = None
    query_index: int | None = None
    tile_labels: np.ndarray | None = None
    prediction: np.ndarray | None = None
    confidence: np.ndarray | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)
    _index: Any = field(default=None, repr=False)
    _index_raster: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.coords = np.asarray(self.coords, dtype=np.int64)
        self.grid_rc = np.asarray(self.grid_rc, dtype=np.int64)
        n = self.features.shape[0]
        if self.coords.shape != (n, 2) or self.grid_rc.shape != (n, 2):
            raise GpfmError("coords / grid_rc do not match the features: re-embed the slide")
        self.grid_shape = (int(self.grid_shape[0]), int(self.grid_shape[1]))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_embeddings(
        cls,
        emb: Any,
        *,
        key: str,
        name: str,
        slide_path: str | Path | None = None,
        mpp: tuple[float, float] | float | None = None,
        path: str | Path | None = None,
    ) -> SlideSession:
        """Build a session from a :func:`gpfm_core.embed.load_embeddings` result.

        Parameters
        ----------
        emb
            ``Embeddings`` with ``features`` (N, D), ``coords`` (N, 2), optional ``grid_rc``
            (N, 2) and ``attrs`` (stride / tile size in level-0 px, slide µm/px, grid shape).
        key, name
            Slide identity and display name.
        slide_path
            Slide file (thumbnails for the gallery).
        mpp
            Level-0 µm/px; overrides the value stored in the attributes.
        path
            The HDF5 file.
        """
        attrs: Mapping[str, Any] = dict(getattr(emb, "attrs", {}) or {})
        coords = np.asarray(emb.coords, dtype=np.int64)
        tile = int(_attr(attrs, _TILE_KEYS, 0) or 0)
        stride = int(_attr(attrs, _STRIDE_KEYS, 0) or 0) or tile
        if tile <= 0 or stride <= 0:
            raise GpfmError(
                "embedding file lacks the tile size: re-embed the slide with this version"
            )
        if mpp is None:
            mpp = _attr(attrs, _MPP_KEYS)
        if mpp is None and "slide_mpp_x" in attrs:
            mpp = (
                float(attrs["slide_mpp_x"]),
                float(attrs.get("slide_mpp_y", attrs["slide_mpp_x"])),
            )
        if mpp is None:
            raise GpfmError("embedding file lacks the slide µm/px: re-embed the slide")
        grid_rc = getattr(emb, "grid_rc", None)
        origin = coords.min(axis=0) if len(coords) else np.zeros(2, np.int64)
        if grid_rc is None:
            grid_rc = np.stack(
                [(coords[:, 1] - origin[1]) // stride, (coords[:, 0] - origin[0]) // stride], axis=1
            )
        grid_rc = np.asarray(grid_rc, dtype=np.int64)
        shape = _attr(attrs, ("grid_shape",))
        if shape is None and "grid_rows" in attrs and "grid_cols" in attrs:
            shape = (int(attrs["grid_rows"]), int(attrs["grid_cols"]))
        if shape is None:
            shape = (int(grid_rc[:, 0].max()) + 1, int(grid_rc[:, 1].max()) + 1)
        encoder = str(_attr(attrs, ("encoder", "encoder_name"), ""))
        tiling = {
            k: attrs[k] for k in ("requested_mpp", "tile_px", "overlap_px") if k in attrs
        }
        return cls(
            key=key,
            name=name,
            slide_path=Path(slide_path) if slide_path else None,
            features=np.asarray(emb.features),
            coords=coords,
            grid_rc=grid_rc,
            grid_shape=tuple(int(v) for v in np.asarray(shape).ravel()[:2]),  # type: ignore[arg-type]
            stride=stride,
            tile_size=tile,
            mpp=_pair(mpp),
            embeddings_path=Path(path) if path else None,
            encoder=encoder,
            weights_hash=str(attrs.get("weights_hash", "") or ""),
            tiling=tiling,
        )

    # ------------------------------------------------------------------ provenance
    @property
    def slide_id(self) -> str:
        """The slide's id (the session key)."""
        return self.key

    @property
    def feature_key(self) -> tuple[Any, ...]:
        """What makes two sessions' features comparable: encoder, weights, tiling, width.

        ``(encoder, weights_hash, requested_mpp rounded to 1e-4 µm/px, tile_px, overlap_px,
        D)``; values a file does not record are ``""``.
        """
        t = self.tiling
        mpp = t.get("requested_mpp")
        return (
            self.encoder,
            self.weights_hash,
            "" if mpp is None else round(float(mpp), 4),
            "" if t.get("tile_px") is None else int(t["tile_px"]),
            "" if t.get("overlap_px") is None else int(t["overlap_px"]),
            int(self.features.shape[1]),
        )

    def comparable(self, other: SlideSession) -> bool:
        """Whether ``other``'s features come from the same encoder, weights and tiling."""
        return self.feature_key == other.feature_key

    def provenance(self) -> dict[str, Any]:
        """Slide id, encoder, weights hash and tiling, for the metadata of layers made from it."""
        return {
            "slide_id": self.key,
            "encoder": self.encoder,
            "weights_hash": self.weights_hash,
            "tiling": {k: (v.item() if hasattr(v, "item") else v) for k, v in self.tiling.items()},
        }

    # ------------------------------------------------------------------ geometry
    @property
    def n_tiles(self) -> int:
        """Number of embedded tiles N."""
        return int(self.features.shape[0])

    @property
    def origin(self) -> tuple[int, int]:
        """Level-0 ``(x, y)`` of grid cell (0, 0)'s top-left corner."""
        if self.coords.shape[0] == 0:
            return 0, 0
        x = int(self.coords[0, 0] - self.grid_rc[0, 1] * self.stride)
        y = int(self.coords[0, 1] - self.grid_rc[0, 0] * self.stride)
        return x, y

    @property
    def index_raster(self) -> np.ndarray:
        """(rows, cols) int32 raster: tile index of each grid cell, -1 where no tile."""
        if self._index_raster is None:
            raster = np.full(self.grid_shape, -1, dtype=np.int32)
            raster[self.grid_rc[:, 0], self.grid_rc[:, 1]] = np.arange(self.n_tiles, dtype=np.int32)
            self._index_raster = raster
        return self._index_raster

    def raster(self, values: np.ndarray, *, fill: float | int = 0, dtype: Any = None) -> np.ndarray:
        """Scatter per-tile values into a (rows, cols) tile-resolution raster.

        Parameters
        ----------
        values
            (N,) per-tile values.
        fill
            Value of grid cells without a tile.
        dtype
            Output dtype (default: that of ``values``).

        Returns
        -------
        numpy.ndarray
            (rows, cols) array.
        """
        values = np.asarray(values)
        out = np.full(self.grid_shape, fill, dtype=dtype or values.dtype)
        out[self.grid_rc[:, 0], self.grid_rc[:, 1]] = values
        return out

    def fill_raster(self, out: np.ndarray, values: np.ndarray) -> None:
        """Write per-tile ``values`` (N,) into an existing (rows, cols) raster in place."""
        out[self.grid_rc[:, 0], self.grid_rc[:, 1]] = values

    def tile_at(self, x: float, y: float) -> int | None:
        """Index of the embedded tile whose grid cell holds level-0 point ``(x, y)``, else None."""
        ox, oy = self.origin
        col = int(np.floor((x - ox) / self.stride))
        row = int(np.floor((y - oy) / self.stride))
        if not (0 <= row < self.grid_shape[0] and 0 <= col < self.grid_shape[1]):
            return None
        idx = int(self.index_raster[row, col])
        return idx if idx >= 0 else None

    def tile_center(self, index: int) -> tuple[float, float]:
        """Level-0 ``(x, y)`` centre of tile ``index`` (pixel-centre convention)."""
        x, y = self.coords[index]
        half = (self.tile_size - 1) / 2.0
        return float(x + half), float(y + half)

    def tile_centers(self) -> np.ndarray:
        """(N, 2) float64 level-0 ``(x, y)`` centres of all tiles."""
        return self.coords.astype(np.float64) + (self.tile_size - 1) / 2.0

    # ------------------------------------------------------------------ caches
    def similarity_index(self) -> Any:
        """The cached :class:`gpfm_core.analysis.SimilarityIndex`: features centred on the
        slide's mean and normalised, once per session."""
        if self._index is None:
            from gpfm_core.analysis import SimilarityIndex

            self._index = SimilarityIndex(self.features, center=True)
        return self._index


class SessionStore:
    """Sessions of every embedded slide, keyed by slide key; remembers the active one."""

    def __init__(self) -> None:
        self._sessions: dict[str, SlideSession] = {}
        self.active_key: str | None = None

    def add(self, session: SlideSession) -> SlideSession:
        """Add or replace ``session`` and make it active."""
        self._sessions[session.key] = session
        self.active_key = session.key
        log.info("session %s: %d tiles", session.name, session.n_tiles)
        return session

    def get(self, key: str | None) -> SlideSession | None:
        """The session of ``key`` or None."""
        return self._sessions.get(key) if key is not None else None

    def by_name(self, name: str) -> SlideSession | None:
        """The session whose slide layer is called ``name``."""
        return next((s for s in self._sessions.values() if s.name == name), None)

    @property
    def active(self) -> SlideSession | None:
        """The session last embedded or selected."""
        return self.get(self.active_key)

    def remove(self, key: str) -> None:
        """Forget a slide (its layer was closed)."""
        self._sessions.pop(key, None)
        if self.active_key == key:
            self.active_key = next(iter(self._sessions), None)

    def split_comparable(
        self, session: SlideSession
    ) -> tuple[list[SlideSession], list[SlideSession]]:
        """Sessions whose features are comparable with ``session``'s (itself first), and the rest.

        Comparable means the same encoder, weights and tiling (:meth:`SlideSession.comparable`).
        """
        same = [session] + [s for s in self if s is not session and s.comparable(session)]
        other = [s for s in self if s is not session and not s.comparable(session)]
        return same, other

    def __iter__(self) -> Iterator[SlideSession]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)
