"""Cosine similarity between tiles, point-to-tile lookup and top-k retrieval.

Centred cosine
--------------
Raw cosine is unreadable on tile embeddings: every feature shares a large common component
(the slide's stain and background, a CLS token's bias), so all tiles score alike (0.98 to
0.999 with ``hed-texture``; an epidermis tile scored 0.983 against a stroma query). Retrieval
protocols standardise features before comparing them (the GPFM paper's ROI retrieval
z-scores them); :func:`center_features` subtracts the slide's (or a cohort's) mean, and
:class:`SimilarityIndex` with ``center=True`` keeps the centred, unit rows once, so a query
costs one (N, D) matrix-vector product as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from gpfm_core.analysis._util import as_features, as_points, positive_int, size_xy
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

_EPS = 1e-12


def center_features(
    features: np.ndarray,
    *,
    mean: np.ndarray | None = None,
    unit: bool = False,
    finite: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract a mean feature vector from every row (and optionally normalise the rows).

    The one centring of the project: the dock's similarity (:class:`SimilarityIndex`, the
    slide's own mean), the cohort index (:mod:`gpfm_core.cohort.index`, the running cohort
    mean) and the int8 fidelity check (:func:`gpfm_core.embed.device.feature_fidelity`, the
    sample's mean) all call it.

    Parameters
    ----------
    features
        (N, D) float array, one embedding per tile (float16 is upcast).
    mean
        (D,) mean to subtract (a cohort's, for slides compared with each other); default the
        mean of ``features`` (the slide's own, accumulated in float64).
    unit
        Also L2-normalise each centred row, so dot products are centred cosines; a row equal
        to the mean stays zero.
    finite
        Refuse NaN / inf values (False lets them through, e.g. to be caught by the caller).

    Returns
    -------
    tuple of numpy.ndarray
        centred (N, D) float32 (a new array; unit rows with ``unit``) and the mean (D,)
        float32 subtracted.

    Raises
    ------
    GpfmError
        Not an (N, D) numeric array, NaN / inf values (with ``finite``), or a ``mean`` of
        another width.
    """
    x = as_features(features, finite=finite)
    if mean is None:
        mu = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    else:
        mu = np.asarray(mean, dtype=np.float32).reshape(-1)
        if mu.shape != (x.shape[1],) or not np.isfinite(mu).all():
            raise GpfmError(
                f"mean must be a finite ({x.shape[1]},) vector: compute it on features of this encoder"
            )
    centred = np.subtract(x, mu, dtype=np.float32)
    if unit:
        _unit_rows_(centred)
    return centred, mu


def _unit_rows_(x: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of a float32 array in place (zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    np.maximum(norms, _EPS, out=norms)
    x /= norms[:, None]
    return x


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """L2-normalise each row; all-zero rows stay zero.

    Parameters
    ----------
    features
        (N, D) float array.

    Returns
    -------
    numpy.ndarray
        (N, D) float32, C-contiguous, rows of unit norm.
    """
    x = as_features(features, finite=False)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # float32, no (N, D) temporary
    # a NaN / inf anywhere in a row makes its norm non-finite: one cheap check, no (N, D) mask
    if not np.isfinite(norms).all():
        raise GpfmError("features contain NaN or inf: re-embed the slide or drop those tiles")
    np.maximum(norms, _EPS, out=norms)
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


PRECISIONS = ("float32", "float16", "bfloat16")


class SimilarityIndex:
    """Normalised features cached once, so each query is one matrix-vector product.

    ``precision="float32"`` (default) holds a float32 copy of the unit features (400 MB for
    100,000 x 1024) and computes the exact cosine with one numpy matvec; a query reads all
    of it, so its speed is bounded by memory bandwidth (and, on 2 cores, by the cores).

    ``"float16"`` / ``"bfloat16"`` store the unit features at half the memory (200 MB) in a
    torch tensor and compute the matvec there (float32 result). Measured for 100,000 x 1024
    on the 2-core benchmark machine (``benchmarks/bench_analysis.py``, load average ~2):
    float32 17 ms (bare numpy matvec 16 ms), bfloat16 12 ms, float16 30 ms (no fast fp16
    matvec on CPU; numpy float16 is ~10x slower still). Under heavy load (load average 5-13)
    all of them are 2-5x slower. float32 stays the default: it is exact and within the 30 ms
    target; bfloat16 is the option for memory (and ~30 % speed) at a small error.
    Accuracy against the exact float32 cosine (a test checks it on 1024-d features): max abs
    error <= 2e-3 for bfloat16 (8-bit mantissa, ~1.1e-3 measured), <= 3e-4 for float16
    (~1.5e-4), and the top-100 tiles agree >= 95 % (99/100 measured; near-ties may swap).

    With ``center`` the rows are centred before they are normalised (see the module
    docstring); the centring is paid once here, never per query.

    Parameters
    ----------
    features
        (N, D) float array, one embedding per tile.
    precision
        ``"float32"`` (exact), ``"float16"`` or ``"bfloat16"`` (torch, half the memory).
    center
        False: raw cosine. True: centred on the mean of ``features`` (the slide's). A (D,)
        array: centred on that mean (a cohort's).

    Attributes
    ----------
    mean
        (D,) float32 mean subtracted, or None (raw cosine).
    """

    def __init__(
        self, features: np.ndarray, *, precision: str = "float32", center: bool | np.ndarray = False
    ) -> None:
        if precision not in PRECISIONS:
            raise GpfmError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.mean: np.ndarray | None = None
        if isinstance(center, (bool, np.bool_)) and not center:
            normed = normalize_rows(features)
        else:
            given = None if isinstance(center, (bool, np.bool_)) else center
            normed, self.mean = center_features(features, mean=given, unit=True)
        self._half = None
        if precision == "float32":
            self._normed: np.ndarray | None = normed
        else:
            import torch  # lazy: only the half-precision index needs it

            self._half = torch.from_numpy(normed).to(getattr(torch, precision))
            self._normed = None
            self._shape = normed.shape
            del normed

    @property
    def n(self) -> int:
        """Number of tiles N."""
        return int(self._normed.shape[0] if self._normed is not None else self._shape[0])

    @property
    def dim(self) -> int:
        """Feature width D."""
        return int(self._normed.shape[1] if self._normed is not None else self._shape[1])

    @property
    def normalized(self) -> np.ndarray:
        """(N, D) float32 unit rows, centred when the index is (read-only).

        A float32 copy for a half-precision index.
        """
        view = self._normed.view() if self._normed is not None else self._half.float().numpy()
        view.flags.writeable = False
        return view

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """Stored unit rows ``idx`` as float32."""
        if self._normed is not None:
            return self._normed[idx]
        import torch

        return self._half[torch.from_numpy(idx)].float().numpy()

    def query_vector(self, query: np.ndarray, *, centred: bool = False) -> np.ndarray:
        """Unit (D,) float32 direction of a query: one vector, or the mean of Q unit vectors.

        Raw feature vectors are centred on :attr:`mean` first (when the index is centred);
        ``centred=True`` says the query is already a direction of the centred space (e.g.
        :meth:`direction` of another slide's index), used as it is.
        """
        q = np.asarray(query, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise GpfmError(
                f"query has shape {np.shape(query)} but features are {self.dim}-d: "
                "query with features from the same encoder"
            )
        if not np.isfinite(q).all():
            raise GpfmError("query contains NaN or inf: pick another tile")
        if self.mean is not None and not centred:
            q = q - self.mean
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        mean = (q / np.maximum(norms, _EPS)).mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if norm < 1e-6:
            if self.mean is not None:
                raise GpfmError(
                    "the query equals the slide's average tile, so centred similarity says "
                    "nothing about it: pick another tile"
                )
            raise GpfmError("query vector is zero (or its parts cancel out): pick other tiles")
        return (mean / norm).astype(np.float32)

    def query(self, query: np.ndarray, *, centred: bool = False) -> np.ndarray:
        """Cosine similarity (centred when the index is) of every tile to ``query``.

        Parameters
        ----------
        query
            (D,) vector or (Q, D) vectors (their unit vectors are averaged): raw features,
            or with ``centred=True`` directions of the centred space (see :meth:`direction`).
        centred
            The query is already centred (not centred again on this index's mean).

        Returns
        -------
        numpy.ndarray
            (N,) float32 in [-1, 1].
        """
        q = self.query_vector(query, centred=centred)
        if self._normed is not None:
            return self._normed @ q
        import torch

        with torch.no_grad():
            qt = torch.from_numpy(q).to(self._half.dtype)
            return torch.mv(self._half, qt).float().numpy()

    def direction(self, indices: int | np.ndarray) -> np.ndarray:
        """Unit (D,) float32 query direction of one tile, or the mean of several (by index).

        A direction of this index's (centred) space: pass it to another slide's index with
        ``query(direction, centred=True)`` to search that slide with the same query.
        """
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.size == 0 or idx.min() < -self.n or idx.max() >= self.n:
            raise GpfmError(f"tile indices must lie in [0, {self.n}): pick tiles of this slide")
        return self.query_vector(self._rows(idx), centred=True)

    def query_tiles(self, indices: int | np.ndarray) -> np.ndarray:
        """Similarity to one tile or the mean direction of several tiles (by index).

        Returns
        -------
        numpy.ndarray
            (N,) float32.
        """
        return self.query(self.direction(indices), centred=True)


def cosine_similarity(
    features: np.ndarray, query: np.ndarray, *, center: bool | np.ndarray = False
) -> np.ndarray:
    """Cosine similarity of each row of ``features`` to ``query`` (one-off; see SimilarityIndex).

    Parameters
    ----------
    features
        (N, D) float array.
    query
        (D,) or (Q, D) raw feature vectors; several queries are averaged as unit vectors.
    center
        Centre features and query on the mean of ``features`` (True) or on a given (D,)
        mean before the cosine (see the module docstring).

    Returns
    -------
    numpy.ndarray
        (N,) float32.
    """
    return SimilarityIndex(features, center=center).query(query)


def query_from_point(
    x: float, y: float, coords: np.ndarray, tile_size_level0: int | tuple[int, int]
) -> int | None:
    """Index of the tile containing level-0 point (x, y), or None outside every tile.

    With overlapping tiles the one whose centre is nearest wins (lowest index on ties).

    Parameters
    ----------
    x, y
        Level-0 pixel coordinates (a pixel-centre convention: pixel j spans [j-0.5, j+0.5)).
    coords
        (N, 2) int64 level-0 (x, y) top-left corners.
    tile_size_level0
        Tile side in level-0 pixels, or its ``(width, height)`` (non-square pixels).
    """
    xy = as_points(coords, name="coords")
    tw, th = size_xy(tile_size_level0, name="tile_size_level0")
    if not (np.isfinite(x) and np.isfinite(y)):
        return None
    # tile covers pixels c .. c+t-1, i.e. [c - 0.5, c + t - 0.5) in pixel-centre coordinates
    px, py = float(x) + 0.5, float(y) + 0.5
    inside = (xy[:, 0] <= px) & (px < xy[:, 0] + tw) & (xy[:, 1] <= py) & (py < xy[:, 1] + th)
    hits = np.flatnonzero(inside)
    if hits.size == 0:
        return None
    if hits.size == 1:
        return int(hits[0])
    centre = xy[hits] + np.array([tw, th]) / 2.0
    d2 = (centre[:, 0] - px) ** 2 + (centre[:, 1] - py) ** 2
    return int(hits[int(np.argmin(d2))])


def neighbourhood_indices(index: int, grid_rc: np.ndarray, *, radius: int = 1) -> np.ndarray:
    """Indices of tile ``index`` and its existing grid neighbours (Chebyshev ``radius``).

    Returns
    -------
    numpy.ndarray
        (M,) int64, sorted, always containing ``index``.
    """
    rc = as_points(grid_rc, name="grid_rc")
    n = rc.shape[0]
    if isinstance(index, bool) or not 0 <= int(index) < n:
        raise GpfmError(f"tile index {index!r} is outside [0, {n}): pick a tile of this slide")
    if isinstance(radius, bool) or int(radius) < 0:
        raise GpfmError(f"radius must be >= 0, got {radius!r}")
    d = np.abs(rc - rc[int(index)]).max(axis=1)
    return np.flatnonzero(d <= int(radius)).astype(np.int64)


def neighbourhood_query(
    index: int, grid_rc: np.ndarray, features: np.ndarray, radius: int = 1
) -> np.ndarray:
    """Query vector: mean of the unit features of a tile and its existing grid neighbours.

    Parameters
    ----------
    index
        Tile index (e.g. from :func:`query_from_point`).
    grid_rc
        (N, 2) int64 (row, col) grid positions.
    features
        (N, D) float array.
    radius
        Neighbourhood half-width in tiles (1 -> up to 3x3 tiles; 0 -> the tile alone).

    Returns
    -------
    numpy.ndarray
        (D,) float32 unit vector.
    """
    x = as_features(features)
    if np.shape(grid_rc)[0] != x.shape[0]:
        raise GpfmError("grid_rc and features have different lengths: pass arrays of one slide")
    idx = neighbourhood_indices(index, grid_rc, radius=radius)
    rows = x[idx]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), _EPS)
    mean = rows.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise GpfmError("the neighbourhood's features cancel out: use radius=0")
    return (mean / norm).astype(np.float32)


def top_k(
    scores: np.ndarray, k: int, *, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores, best first (NaN never ranks; ties: lower index first).

    Parameters
    ----------
    scores
        (N,) float scores.
    k
        How many; fewer are returned when fewer valid scores exist.
    exclude
        (M,) indices or (N,) bool mask of tiles to leave out (e.g. the query tile).

    Returns
    -------
    tuple of numpy.ndarray
        indices (k,) int64 and scores (k,) float32.
    """
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 1:
        raise GpfmError(f"scores must be 1-D (N,), got shape {s.shape}")
    k = positive_int(k, name="k")
    valid = ~np.isnan(s)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            if ex.shape != s.shape:
                raise GpfmError("exclude mask must have the same length as scores")
            valid &= ~ex
        elif ex.size:
            valid[ex.astype(np.int64)] = False
    cand = np.flatnonzero(valid)
    k = min(k, cand.size)
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    vals = s[cand]
    if k < cand.size:
        part = np.argpartition(-vals, k - 1)[:k]
        # include every candidate tied with the k-th value so tie-breaking is by index
        kth = vals[part].min()
        part = np.flatnonzero(vals >= kth)
        cand, vals = cand[part], vals[part]
    order = np.lexsort((cand, -vals))[:k]
    return cand[order].astype(np.int64), vals[order].astype(np.float32)


def top_k_multi(scores_by_slide: Mapping[str, np.ndarray], k: int) -> list[tuple[str, int, float]]:
    """Top k tiles across several slides.

    Parameters
    ----------
    scores_by_slide
        ``{slide_key: (N_s,) scores}``.
    k
        How many in total.

    Returns
    -------
    list of (slide_key, index, score)
        Best first; ties by slide key then index.
    """
    k = positive_int(k, name="k")
    hits: list[tuple[str, int, float]] = []
    for key, scores in scores_by_slide.items():
        idx, val = top_k(scores, k)
        hits.extend((key, int(i), float(v)) for i, v in zip(idx, val, strict=True))
    hits.sort(key=lambda h: (-h[2], h[0], h[1]))
    return hits[:k]
