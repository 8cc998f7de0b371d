"""The embedding engine: slide -> one embedding per tile, in a TRIDENT/CLAM HDF5 file.

>>> from gpfm_core.embed import embed_slide, load_embeddings
>>> path = embed_slide("CMU-1.svs", encoder="tiny-vit", out_dir="emb")   # doctest: +SKIP
>>> emb = load_embeddings(path)        # features (N, D) float32, coords (N, 2) int64

Files live at ``<out_dir>/<mpp>mpp_<tile_px>px_<overlap>px_overlap/features_<encoder>-<hash8>/
<slide_stem>.h5`` (TRIDENT's layout; :mod:`gpfm_core.embed.layout`), one writer at a time per
file (:func:`slide_lock`); the file's contents: :mod:`gpfm_core.embed.storage`; foreign files'
tile geometry: :mod:`gpfm_core.embed.geometry`. torch is imported only when a slide is embedded.
"""

from __future__ import annotations

from gpfm_core.embed._errors import EmbedCancelled, EmbeddingsClashError
from gpfm_core.embed.batch import SlideOutcome, embed_slides
from gpfm_core.embed.device import CudaOutOfMemory, OomBackoff, resolve_device, resolve_precision
from gpfm_core.embed.geometry import TileGeometry
from gpfm_core.embed.layout import (
    EmbeddingsLockTimeout,
    embeddings_path,
    features_dir,
    find_embeddings,
    slide_lock,
)
from gpfm_core.embed.loading import (
    Embeddings,
    EmbeddingsFileError,
    GeometryWarning,
    load_embeddings,
    read_attrs,
)
from gpfm_core.embed.pipeline import (
    EmbedProgress,
    EmbedResult,
    NoTissueWarning,
    embed_slide,
    iter_embed_slide,
    resolve_encoder,
)
from gpfm_core.embed.storage import EmbeddingWriter

__all__ = [
    "CudaOutOfMemory",
    "EmbedCancelled",
    "EmbedProgress",
    "EmbedResult",
    "EmbeddingWriter",
    "Embeddings",
    "EmbeddingsClashError",
    "EmbeddingsFileError",
    "EmbeddingsLockTimeout",
    "GeometryWarning",
    "NoTissueWarning",
    "OomBackoff",
    "SlideOutcome",
    "TileGeometry",
    "embed_slide",
    "embed_slides",
    "embeddings_path",
    "features_dir",
    "find_embeddings",
    "iter_embed_slide",
    "load_embeddings",
    "read_attrs",
    "resolve_device",
    "resolve_encoder",
    "resolve_precision",
    "slide_lock",
]
