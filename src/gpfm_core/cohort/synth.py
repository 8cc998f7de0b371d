"""Synthetic cohorts, for tests, benchmarks and the demo.

Real tile embeddings are clustered (tissue types), share a large common direction, and
vary within a cluster along few directions. :func:`clustered_features` draws features
like that; :func:`write_feature_file` stores them with the real
:class:`~gpfm_core.embed.storage.EmbeddingWriter`, so every reader sees a genuine file
(no slide, no model). :func:`write_slide_cohort` writes real slide files instead (mosaics
of the sample images, :func:`gpfm_core.synth.make_synthetic_slide`) and their manifest,
ready for ``gpfm embed``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpfm_core.embed.storage import EmbeddingWriter


def clustered_features(
    n: int,
    dim: int,
    *,
    seed: int,
    cohort_seed: int = 0,
    n_clusters: int = 200,
    latent_dim: int = 32,
    latent_scale: float = 1.0,
    noise: float = 0.1,
    offset: float = 2.0,
    clusters: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``n`` tile features from a fixed clustered distribution.

    ``x = offset_vector + centre[c] + basis @ z + noise`` where the offset (norm about
    ``offset * sqrt(dim)``), the ``n_clusters`` centres (entries N(0, 0.5)) and the
    ``latent_dim``-dimensional basis depend only on ``cohort_seed``, so slides drawn with
    different ``seed`` share one cohort; ``z`` ~ N(0, latent_scale) and the noise
    ~ N(0, noise) per entry.

    Parameters
    ----------
    n, dim
        Tiles and feature width.
    seed
        Draws of this slide.
    cohort_seed
        The shared distribution.
    clusters
        Optional (n,) cluster of each tile (default: uniform over the clusters).

    Returns
    -------
    numpy.ndarray
        (n, dim) float32.
    """
    base = np.random.default_rng(cohort_seed)
    centres = base.normal(scale=0.5, size=(n_clusters, dim)).astype(np.float32)
    basis = np.linalg.qr(base.normal(size=(dim, latent_dim)))[0].T.astype(np.float32)
    shift = base.normal(scale=offset, size=dim).astype(np.float32)
    rng = np.random.default_rng([cohort_seed, seed])
    lab = rng.integers(n_clusters, size=n) if clusters is None else np.asarray(clusters)
    z = rng.normal(scale=latent_scale, size=(n, latent_dim)).astype(np.float32)
    x = z @ basis
    x += centres[lab]
    x += shift
    x += rng.normal(scale=noise, size=(n, dim)).astype(np.float32)
    return x


def write_feature_file(
    path: str | os.PathLike[str],
    features: np.ndarray,
    *,
    slide_id: str,
    encoder: str = "synthetic",
    weights_hash: str = "0" * 16,
    tile_px: int = 224,
    mpp: float = 0.5,
    tile_size_level0: int = 448,
    dtype: str = "float32",
    coords: np.ndarray | None = None,
    slide_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a feature file as ``gpfm embed`` would (root attributes for grouping included).

    Parameters
    ----------
    path
        The ``.h5`` to write.
    features
        (N, D) features.
    slide_id, encoder, weights_hash, tile_px, mpp, tile_size_level0
        The attributes that identify the slide, its group and its tile size.
    dtype
        ``"float32"`` or ``"float16"`` on disk.
    coords
        (N, 2) level-0 (x, y); default a row-major grid of ``tile_size_level0`` tiles.
    slide_path
        The slide the tiles claim to come from (``slide_path`` attribute, as ``gpfm embed``
        records it), e.g. a real generated slide so thumbnails of the tiles can be read.

    Returns
    -------
    Path
        ``path``.
    """
    feats = np.asarray(features)
    n, dim = feats.shape
    if coords is None:
        cols = max(1, int(np.ceil(np.sqrt(n))))
        rc = np.stack([np.arange(n) // cols, np.arange(n) % cols], axis=1).astype(np.int64)
        coords = rc[:, ::-1] * tile_size_level0
    else:
        rc = np.asarray(coords, dtype=np.int64)[:, ::-1] // tile_size_level0
    attrs = {
        "encoder": encoder,
        "weights_hash": weights_hash,
        "tile_px": tile_px,
        "requested_mpp": mpp,
        "overlap_px": 0,
        "tile_size_level0": tile_size_level0,
        "stride_level0": tile_size_level0,
        "slide_id": slide_id,
        "slide_name": Path(path).stem,
        "n_tiles": n,
        "embed_dim": dim,
    }
    if slide_path is not None:
        attrs["slide_path"] = str(Path(slide_path).resolve())
    with EmbeddingWriter(
        path,
        coords=coords,
        grid_rc=rc,
        tissue_fraction=np.ones(n, np.float32),
        embed_dim=dim,
        dtype=dtype,
        attrs=attrs,
    ) as w:
        w.write(np.arange(n), feats)
        return w.commit()


def write_slide_cohort(
    folder: str | os.PathLike[str],
    *,
    n_slides: int = 3,
    size: tuple[int, int] = (1536, 1152),
    mpp: float = 0.5,
    sources: Sequence[str | os.PathLike[str]] | None = None,
    include: Sequence[str | os.PathLike[str]] = (),
    seed: int = 0,
) -> Path:
    """Write a small cohort of real slide files and its manifest (``cohort.csv`` input).

    Slides already there are kept (same arguments, same content): a second call writes
    nothing but the manifest, so it is cheap to call every time (the demo does).

    Parameters
    ----------
    folder
        Where ``slides/cohort-<i>.svs`` and ``manifest.csv`` go (created).
    n_slides
        Generated slides.
    size
        Level-0 (width, height) of each, px.
    mpp
        Their level-0 µm/px.
    sources
        Tissue images mosaicked (default: the sample images, see
        :func:`gpfm_core.synth.make_synthetic_slide`).
    include
        Existing slides listed in the manifest first (e.g. the sample slide itself).
    seed
        Seed of the first slide; slide ``i`` uses ``seed + i``.

    Returns
    -------
    Path
        The manifest (``path,slide_id``; absolute paths).
    """
    from gpfm_core._atomic import write_atomic
    from gpfm_core.synth import make_synthetic_slide

    root = Path(folder)
    slides = [Path(p).resolve() for p in include]
    for i in range(int(n_slides)):
        path = root / "slides" / f"cohort-{i + 1}.svs"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            make_synthetic_slide(
                path, width=size[0], height=size[1], mpp=mpp, tile=256, sources=sources,
                seed=seed + i,
            )  # fmt: skip
        slides.append(path.resolve())
    text = "\n".join(["path,slide_id", *(f"{p},{p.stem}" for p in slides)]) + "\n"
    manifest = root / "manifest.csv"
    if manifest.is_file() and manifest.read_text(encoding="utf-8") == text:
        return manifest
    return write_atomic(manifest, text, parents=True)
