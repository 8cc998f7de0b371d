"""The embedding engine: slide -> one embedding per tile, in a TRIDENT/CLAM HDF5 file.

>>> from gpfm_core.embed import embed_slide, load_embeddings
>>> path = embed_slide("CMU-1.svs", encoder="tiny-vit", out_dir="emb")   # doctest: +SKIP
>>> emb = load_embeddings(path)        # features (N, D) float32, coords (N, 2) int64

Files live at ``<out_dir>/<slide_stem>.h5`` (see :mod:`gpfm_core.embed.storage` for the
layout). torch is imported only when a slide is embedded.
"""

from __future__ import annotations

from gpfm_core.embed.batch import SlideOutcome, embed_slides
from gpfm_core.embed.device import CudaOutOfMemory, OomBackoff, resolve_device, resolve_precision
from gpfm_core.embed.loading import (
    Embeddings,
    EmbeddingsFileError,
    find_embeddings,
    load_embeddings,
    read_attrs,
)
from gpfm_core.embed.pipeline import (
    EmbedCancelled,
    EmbedProgress,
    EmbedResult,
    NoTissueWarning,
    embed_slide,
    iter_embed_slide,
    resolve_encoder,
)
from gpfm_core.embed.storage import EmbeddingWriter, embeddings_path

__all__ = [
    "CudaOutOfMemory",
    "EmbedCancelled",
    "EmbedProgress",
    "EmbedResult",
    "EmbeddingWriter",
    "Embeddings",
    "EmbeddingsFileError",
    "NoTissueWarning",
    "OomBackoff",
    "SlideOutcome",
    "embed_slide",
    "embed_slides",
    "embeddings_path",
    "find_embeddings",
    "iter_embed_slide",
    "load_embeddings",
    "read_attrs",
    "resolve_device",
    "resolve_encoder",
    "resolve_precision",
]
