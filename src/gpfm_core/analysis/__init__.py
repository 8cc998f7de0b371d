"""Interactive slide analysis on tile embeddings (numpy / scikit-learn / umap, no GUI).

Everything takes plain arrays: ``features (N, D)`` float32, ``coords (N, 2)`` int64 level-0
(x, y) top-left corners, ``grid_rc (N, 2)`` int64 (row, col). scikit-learn, umap-learn,
numba, shapely and scikit-image are imported lazily inside the functions that need them, so importing
this package is cheap.
"""

from __future__ import annotations

from gpfm_core.analysis.clustering import density_clusters, kmeans_clusters, order_by_size
from gpfm_core.analysis.embedding import pca_reduce, umap_embed
from gpfm_core.analysis.io import (
    Annotation,
    QuPathObjects,
    annotations_to_geojson,
    predictions_to_geojson,
    read_qupath_geojson,
    shapes_to_geojson,
)
from gpfm_core.analysis.labels import ShapeLabels, labels_for_shapes
from gpfm_core.analysis.probe import (
    CVPlan,
    LinearProbe,
    ProbeProvenanceWarning,
    ProbeReport,
    plan_cv,
)
from gpfm_core.analysis.raster import tile_layer_placement, tiles_to_raster
from gpfm_core.analysis.similarity import (
    SimilarityIndex,
    center_features,
    cosine_similarity,
    neighbourhood_indices,
    neighbourhood_query,
    normalize_rows,
    query_from_point,
    top_k,
    top_k_multi,
)
from gpfm_core.analysis.tables import predictions_to_csv

__all__ = [
    "Annotation",
    "CVPlan",
    "LinearProbe",
    "ProbeProvenanceWarning",
    "ProbeReport",
    "QuPathObjects",
    "ShapeLabels",
    "SimilarityIndex",
    "annotations_to_geojson",
    "center_features",
    "cosine_similarity",
    "density_clusters",
    "kmeans_clusters",
    "labels_for_shapes",
    "neighbourhood_indices",
    "neighbourhood_query",
    "normalize_rows",
    "order_by_size",
    "pca_reduce",
    "plan_cv",
    "predictions_to_csv",
    "predictions_to_geojson",
    "query_from_point",
    "read_qupath_geojson",
    "shapes_to_geojson",
    "tile_layer_placement",
    "tiles_to_raster",
    "top_k",
    "top_k_multi",
    "umap_embed",
]
