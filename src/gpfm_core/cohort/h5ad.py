"""A cohort as AnnData (``.h5ad``): tiles × features, for scverse (scanpy, squidpy ...).

Written with the ``anndata`` package:

- ``X``: (tiles, D) float32 features, slide after slide in cohort-table order. ``X`` is a
  dask array read one slide at a time while ``write_h5ad`` streams it, so the features of
  the whole cohort never sit in memory at once.
- ``obs`` (one row per tile, index ``"<slide>:<row>"``): ``slide`` (categorical, the
  cohort's ``slide_id``), ``x``, ``y`` (level-0 px, top-left), ``tissue_fraction``, and
  where known: ``cluster`` (k-means over the cohort, ``clusters=k``), ``prediction`` and
  ``confidence`` (a linear probe, ``probe=``).
- ``var``: ``f0`` ... ``f<D-1>``.
- ``obsm["spatial"]``: (tiles, 2) level-0 ``(x, y)`` of each tile's centre (squidpy's key;
  one coordinate frame per slide: group by ``obs["slide"]``).
- ``uns["gpfm"]``: encoder, weights hash, tiling, µm/px, tile size; ``uns["gpfm_slides"]``:
  one row per slide (path, feature file, content id, tiles).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core._atomic import atomic_path
from gpfm_core.cohort.store import (
    Cohort,
    CohortError,
    check_unique_slides,
    open_cohort,
    read_features,
)
from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    from gpfm_core.analysis.probe import LinearProbe

log = logging.getLogger(__name__)

__all__ = ["export_anndata"]

PathLike = str | os.PathLike[str]


def _import_anndata() -> Any:
    try:
        import anndata
    except ImportError:
        raise GpfmError(
            "exporting AnnData needs the anndata package: pip install anndata"
        ) from None
    return anndata


def _load_block(path: str, dtype: str) -> np.ndarray:
    """One slide's features as a float32 array (opened, read, closed)."""
    return np.asarray(read_features(path, mmap=True), dtype=dtype)


def export_anndata(
    cohort: Cohort | PathLike,
    path: PathLike,
    *,
    slides: list[str] | None = None,
    clusters: int | None = None,
    probe: LinearProbe | PathLike | None = None,
    seed: int = 0,
    encoder: str | None = None,
    tiling: str | None = None,
) -> Path:
    """Write a cohort's tiles × features as an ``.h5ad`` file (atomically).

    Parameters
    ----------
    cohort
        A :class:`~gpfm_core.cohort.store.Cohort` or a cohort folder (opened with
        ``encoder`` / ``tiling``).
    path
        The ``.h5ad`` file to write.
    slides
        Only these slides (names), in this order; default all.
    clusters
        Add ``obs["cluster"]``: k-means with this many clusters over every tile of the
        export (:func:`gpfm_core.analysis.kmeans_clusters`; it holds all features in memory).
    probe
        A :class:`~gpfm_core.analysis.LinearProbe` (or its ``.safetensors`` file): adds
        ``obs["prediction"]`` (categorical class names) and ``obs["confidence"]``.
    seed
        Seed of the k-means.
    encoder, tiling
        Which features, when ``cohort`` is a folder holding several sets.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    CohortError
        Unknown slide names, a slide named twice (in ``slides`` or in the table), or an
        empty selection.
    GpfmError
        anndata is not installed; the probe was trained on features of another width.
    """
    anndata = _import_anndata()
    import dask
    import dask.array as da
    import pandas as pd

    if not isinstance(cohort, Cohort):
        cohort = open_cohort(cohort, encoder=encoder, tiling=tiling)
    if slides is not None and len(set(slides)) != len(slides):
        twice = next(s for s in slides if slides.count(s) > 1)
        raise CohortError(f"slide {twice!r} is asked for twice; list each slide once")
    rows = list(cohort.rows) if slides is None else [cohort.row(s) for s in slides]
    check_unique_slides(rows, cohort.folder)
    rows = [r for r in rows if r.n_tiles > 0]
    if not rows:
        raise CohortError(f"no tiles to export from {cohort.folder}")
    dim = rows[0].embed_dim
    blocks, slide_col, xs, ys, tissue, index, counts = [], [], [], [], [], [], []
    for r in rows:
        emb_path = r.path_in(cohort.folder)
        coords, frac = _coords(emb_path)
        n = coords.shape[0]
        counts.append(n)
        blocks.append(
            da.from_delayed(
                dask.delayed(_load_block)(str(emb_path), "float32"), (n, dim), dtype=np.float32
            )
        )
        slide_col.append(np.full(n, r.slide_id, dtype=object))
        xs.append(coords[:, 0])
        ys.append(coords[:, 1])
        tissue.append(frac if frac is not None else np.full(n, np.nan, dtype=np.float32))
        index.extend(f"{r.slide_id}:{i}" for i in range(n))
    x = da.concatenate(blocks, axis=0)
    obs = pd.DataFrame(
        {
            "slide": pd.Categorical(
                np.concatenate(slide_col), categories=[r.slide_id for r in rows]
            ),
            "x": np.concatenate(xs).astype(np.int64),
            "y": np.concatenate(ys).astype(np.int64),
            "tissue_fraction": np.concatenate(tissue).astype(np.float32),
        },
        index=pd.Index(index, dtype=str),
    )
    if clusters is not None or probe is not None:
        feats = np.concatenate(
            [_load_block(str(r.path_in(cohort.folder)), "float32") for r in rows]
        )
        if clusters is not None:
            from gpfm_core.analysis import kmeans_clusters

            labels = kmeans_clusters(feats, int(clusters), seed=seed)
            obs["cluster"] = pd.Categorical(
                labels.astype(str), categories=[str(i) for i in range(int(clusters))]
            )
        if probe is not None:
            _add_predictions(obs, feats, probe, dim)
        del feats
    centres = _centres(cohort, rows, obs, counts)
    var = pd.DataFrame(index=pd.Index([f"f{i}" for i in range(dim)], dtype=str))
    first = rows[0]
    uns = {
        "gpfm": {
            "encoder": first.encoder,
            "weights_hash": first.weights_hash,
            "tiling": first.tiling,
            "mpp": float(first.mpp),
            "tile_px": int(first.tile_px),
            "overlap_px": int(first.overlap_px),
            "tile_side_um": float(first.tile_px) * float(first.mpp),
        },
        "gpfm_slides": pd.DataFrame(
            {
                "slide_path": [r.slide_path for r in rows],
                "file": [r.file for r in rows],
                "content_id": [r.content_id for r in rows],
                "n_tiles": np.array([r.n_tiles for r in rows], dtype=np.int64),
            },
            index=pd.Index([r.slide_id for r in rows], dtype=str),
        ),
    }
    adata = anndata.AnnData(X=x, obs=obs, var=var, uns=uns, obsm={"spatial": centres})
    out = Path(path)
    with atomic_path(out, parents=True) as tmp:
        adata.write_h5ad(tmp)
    log.info("wrote %s (%d tiles x %d features, %d slides)", out, x.shape[0], dim, len(rows))
    return out


def _coords(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    import h5py

    with h5py.File(path, "r") as f:
        coords = np.asarray(f["coords"][()], dtype=np.int64).reshape(-1, 2)
        frac = (
            np.asarray(f["tissue_fraction"][()], dtype=np.float32)
            if "tissue_fraction" in f
            else None
        )
    return coords, frac


def _centres(cohort: Cohort, rows: list[Any], obs: Any, counts: list[int]) -> np.ndarray:
    """(tiles, 2) float64 level-0 centre of each tile: corner + half its level-0 side."""
    from gpfm_core.embed import read_attrs

    out = np.empty((len(obs), 2), dtype=np.float64)
    start = 0
    for r, n in zip(rows, counts, strict=True):
        attrs = read_attrs(r.path_in(cohort.folder))
        side_x = float(attrs.get("tile_size_level0", 0))
        side_y = float(attrs.get("tile_size_level0_y", side_x))
        out[start : start + n, 0] = obs["x"].to_numpy()[start : start + n] + side_x / 2
        out[start : start + n, 1] = obs["y"].to_numpy()[start : start + n] + side_y / 2
        start += n
    return out


def _add_predictions(obs: Any, feats: np.ndarray, probe: Any, dim: int) -> None:
    import pandas as pd

    from gpfm_core.analysis import LinearProbe

    if not isinstance(probe, LinearProbe):
        probe = LinearProbe.load(probe, embed_dim=dim)
    labels, confidence = probe.predict(feats)
    names = list(probe.class_names)
    obs["prediction"] = pd.Categorical.from_codes(labels, categories=names)
    obs["confidence"] = confidence.astype(np.float32)
