"""Per-slide state of the dock: embeddings, caches and results (plain Python, no Qt).

A :class:`SlideSession` holds one embedded slide: its tile table (features, coords, grid
indices), a lazily built similarity index (L2-normalised features, cached), the
``(rows, cols)`` raster of tile indices used for click look-up and for building
tile-resolution layers, and the analysis results (UMAP, clusters, similarity, probe).

Geometry comes from the file's :class:`~gpfm_core.embed.geometry.TileGeometry` (gpfm,
TRIDENT or CLAM files alike): tile size and stride per axis (they differ for slides with
non-square pixels), the raster's origin, and whether that one raster places every tile
exactly (``exact``; CLAM's per-contour grids do not share one lattice, and their tiles are
then drawn one box per tile from ``coords`` + tile size, see ``_overlays``).

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


def feature_key(
    encoder: str | None, weights_hash: str | None, tiling: Mapping[str, Any] | None, dim: int
) -> tuple[Any, ...]:
    """What makes features comparable: ``(encoder, weights_hash, requested_mpp rounded to
    1e-4 µm/px, tile_px, overlap_px, D)``; values not recorded are ``""``.

    One definition for sessions (:attr:`SlideSession.feature_key`) and for the probes
    trained on them (``LinearProbe.encoder`` / ``weights_hash`` / ``tiling``).
    """
    t = tiling or {}
    mpp = t.get("requested_mpp")
    return (
        encoder or "",
        weights_hash or "",
        "" if mpp is None else round(float(mpp), 4),
        "" if t.get("tile_px") is None else int(t["tile_px"]),
        "" if t.get("overlap_px") is None else int(t["overlap_px"]),
        int(dim),
    )


#: What each entry of :func:`feature_key` is, in words (for messages).
FEATURE_KEY_FIELDS = ("encoder", "weights", "µm/px", "tile size", "overlap", "width")


def key_mismatch(session: SlideSession, key: tuple[Any, ...], what: str) -> str | None:
    """One line saying how ``session``'s features differ from those ``what`` (a probe, a
    slide model) was trained on (``key``, a :func:`feature_key`), or None when they match."""
    have = session.feature_key
    if tuple(key) == have:
        return None
    enc, weights, mpp, px, _overlap, _dim = key
    differ = [lab for lab, a, b in zip(FEATURE_KEY_FIELDS, key, have, strict=True) if a != b]
    return (
        f"{session.name} was embedded with another encoder, weights or tiling than the {what} "
        f"(its {', '.join(differ)} differ; the {what}'s: {enc or 'unknown encoder'}, weights "
        f"{str(weights)[:8] or 'unknown'}, {mpp} µm/px, {px} px tiles): embed it with those"
    )


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
        Grid step along x in level-0 pixels.
    tile_size : int
        Tile width in level-0 pixels.
    mpp : tuple of float
        Level-0 µm/px ``(x, y)`` of the slide.
    embeddings_path : Path or None
        HDF5 file the embeddings came from.
    encoder, weights_hash : str
        Encoder name and weights hash the features came from ("" when the file does not say).
    tiling : dict
        ``requested_mpp`` (µm/px), ``tile_px`` and ``overlap_px`` of the tile grid (empty when
        unknown). With ``encoder`` and ``weights_hash`` it decides :meth:`comparable`.
    stride_y, tile_size_y : int or None
        The same along y (None: as x); they differ for slides with non-square pixels.
    origin_level0 : (int, int) or None
        Level-0 ``(x, y)`` of raster cell (0, 0)'s top-left corner (None: from the first tile).
    exact : bool
        Whether the ``(rows, cols)`` raster places every tile exactly (False for CLAM files
        whose contours start their own grids: overlays are then drawn tile by tile).
    geometry_note : str or None
        What was assumed about the file's geometry (one line), or None.
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
    stride_y: int | None = None
    tile_size_y: int | None = None
    origin_level0: tuple[int, int] | None = None
    exact: bool = True
    geometry_note: str | None = None
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
        self.stride, self.tile_size = int(self.stride), int(self.tile_size)
        self.stride_y = int(self.stride if self.stride_y is None else self.stride_y)
        self.tile_size_y = int(self.tile_size if self.tile_size_y is None else self.tile_size_y)
        if self.origin_level0 is None:
            sx, sy = self.stride_xy
            if n:
                c0, rc0 = self.coords[0], self.grid_rc[0]
                self.origin_level0 = (int(c0[0] - rc0[1] * sx), int(c0[1] - rc0[0] * sy))
            else:
                self.origin_level0 = (0, 0)
        self.origin_level0 = (int(self.origin_level0[0]), int(self.origin_level0[1]))

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
            ``Embeddings`` with ``features`` (N, D), ``coords`` (N, 2), ``grid_rc`` (N, 2),
            ``attrs`` and ``geometry`` (:class:`~gpfm_core.embed.geometry.TileGeometry`: tile
            size and stride per axis, raster origin and shape, ``exact``); gpfm, TRIDENT and
            CLAM files alike.
        key, name
            Slide identity and display name.
        slide_path
            Slide file (thumbnails for the gallery).
        mpp
            Level-0 µm/px; overrides the value stored in the attributes.
        path
            The HDF5 file.

        Raises
        ------
        GpfmError
            The tile geometry cannot be known (the file's note, one line), or no µm/px.
        """
        attrs: Mapping[str, Any] = dict(getattr(emb, "attrs", {}) or {})
        coords = np.asarray(emb.coords, dtype=np.int64)
        geom = getattr(emb, "geometry", None)
        grid_rc = getattr(emb, "grid_rc", None)
        if geom is None:  # not from load_embeddings: read the same attributes it reads
            from gpfm_core.embed.geometry import tile_geometry

            geom, grid_rc = tile_geometry(coords, attrs, grid_rc, name=str(path or name))
        if not geom.known:
            raise GpfmError(
                geom.note
                or "the embeddings file lacks the tile size: load its patching file with it"
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
        (tx, ty), (sx, sy) = geom.tile_size_level0_xy, geom.stride_level0_xy
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
            grid_rc=np.asarray(grid_rc, dtype=np.int64),
            grid_shape=tuple(int(v) for v in geom.grid_shape),  # type: ignore[arg-type]
            stride=sx,
            tile_size=tx,
            mpp=_pair(mpp),
            embeddings_path=Path(path) if path else None,
            encoder=encoder,
            weights_hash=str(attrs.get("weights_hash", "") or ""),
            tiling=tiling,
            stride_y=sy,
            tile_size_y=ty,
            origin_level0=geom.origin,
            exact=bool(geom.exact),
            geometry_note=geom.note,
        )

    # ------------------------------------------------------------------ provenance
    @property
    def slide_id(self) -> str:
        """The slide's id (the session key)."""
        return self.key

    @property
    def feature_key(self) -> tuple[Any, ...]:
        """What makes two sessions' features comparable: encoder, weights, tiling, width
        (:func:`feature_key`)."""
        return feature_key(
            self.encoder, self.weights_hash, self.tiling, int(self.features.shape[1])
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
    def stride_xy(self) -> tuple[int, int]:
        """Level-0 ``(x, y)`` step between neighbouring tiles."""
        return int(self.stride), int(self.stride_y)  # type: ignore[arg-type]

    @property
    def tile_size_xy(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` of a tile."""
        return int(self.tile_size), int(self.tile_size_y)  # type: ignore[arg-type]

    @property
    def origin(self) -> tuple[int, int]:
        """Level-0 ``(x, y)`` of grid cell (0, 0)'s top-left corner."""
        assert self.origin_level0 is not None  # set in __post_init__
        return self.origin_level0

    def tile_boxes(self) -> np.ndarray:
        """(N, 4) int64 level-0 ``(x0, y0, x1, y1)`` of every tile (exact, from ``coords``)."""
        return np.concatenate([self.coords, self.coords + np.asarray(self.tile_size_xy)], axis=1)

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
        """Index of the embedded tile holding level-0 point ``(x, y)``, else None.

        Looked up in the raster when it is exact, else among the tiles' boxes.
        """
        if not self.exact:
            from gpfm_core.analysis import query_from_point

            return query_from_point(x, y, self.coords, self.tile_size_xy)
        ox, oy = self.origin
        sx, sy = self.stride_xy
        col = int(np.floor((x - ox) / sx))
        row = int(np.floor((y - oy) / sy))
        if not (0 <= row < self.grid_shape[0] and 0 <= col < self.grid_shape[1]):
            return None
        idx = int(self.index_raster[row, col])
        return idx if idx >= 0 else None

    def tile_center(self, index: int) -> tuple[float, float]:
        """Level-0 ``(x, y)`` centre of tile ``index`` (pixel-centre convention)."""
        cx, cy = self._centre(self.coords[index])
        return float(cx), float(cy)

    def _centre(self, xy: np.ndarray) -> np.ndarray:
        return xy.astype(np.float64) + (np.asarray(self.tile_size_xy, np.float64) - 1) / 2.0

    def tile_centers(self) -> np.ndarray:
        """(N, 2) float64 level-0 ``(x, y)`` centres of all tiles."""
        return self._centre(self.coords)

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
