"""Cohorts: many slides' feature files together.

>>> from gpfm_core.cohort import build_index, add_to_index, CohortIndex
>>> build_index("cohort/tiny-vit")                                   # doctest: +SKIP
>>> add_to_index("cohort/tiny-vit/gpfm_index", "cohort/tiny-vit/new.h5")  # doctest: +SKIP
>>> idx = CohortIndex.open("cohort/tiny-vit/gpfm_index")             # doctest: +SKIP
>>> idx.search_tile("slide-A", 12, k=10, other_slides_only=True)     # doctest: +SKIP

:mod:`gpfm_core.cohort.files` finds and groups feature files; :mod:`gpfm_core.cohort.index`
is the cohort-wide similarity index (FAISS IVF-PQ candidates, exact re-rank). FAISS is
imported only when an index is built or loaded.
"""

from __future__ import annotations

from gpfm_core.cohort.files import (
    FeatureFilesError,
    FeatureGroup,
    feature_group,
    find_feature_files,
    group_files,
)
from gpfm_core.cohort.index import (
    DEFAULT_TRAIN_MIN,
    CohortHit,
    CohortIndex,
    CohortIndexError,
    IndexedSlide,
    IndexUpdate,
    add_to_index,
    build_index,
    center_on_cohort_mean,
    default_candidates,
    default_index_dir,
    default_nprobe,
    remove_from_index,
)

__all__ = [
    "DEFAULT_TRAIN_MIN",
    "CohortHit",
    "CohortIndex",
    "CohortIndexError",
    "FeatureFilesError",
    "FeatureGroup",
    "IndexUpdate",
    "IndexedSlide",
    "add_to_index",
    "build_index",
    "center_on_cohort_mean",
    "default_candidates",
    "default_index_dir",
    "default_nprobe",
    "feature_group",
    "find_feature_files",
    "group_files",
    "remove_from_index",
]
