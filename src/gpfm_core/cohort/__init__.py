"""Cohorts: many slides embedded into one folder, on one machine or a dask cluster, and one
similarity index over all their tiles.

>>> from gpfm_core.cohort import read_cohort_inputs, run_cohort, open_cohort   # doctest: +SKIP
>>> entries = read_cohort_inputs(["cohort.csv"])          # a manifest, globs or slide paths
>>> run = run_cohort(entries, out_dir="cohort", encoder="gpfm", cluster="local:2")
>>> cohort = open_cohort("cohort")                          # the cohort table, read lazily
>>> feats = cohort.features("case-001")                     # (N, D), memory-mapped
>>> build_index("cohort")                                    # doctest: +SKIP
>>> idx = CohortIndex.open("cohort/gpfm_index")              # doctest: +SKIP
>>> idx.search_tile("slide-A", 12, k=10, other_slides_only=True)     # doctest: +SKIP

Modules: :mod:`~gpfm_core.cohort.manifest` (inputs), :mod:`~gpfm_core.cohort.run` (planning,
one task per slide, retries, the run report), :mod:`~gpfm_core.cohort.distributed` (the dask
side: clusters, GPU resources, progress events), :mod:`~gpfm_core.cohort.table` (the cohort
table ``cohort.csv``), :mod:`~gpfm_core.cohort.store` (:func:`open_cohort`, memory-mapped
features), :mod:`~gpfm_core.cohort.h5ad` (AnnData export), :mod:`~gpfm_core.cohort.files`
(finding and grouping feature files by encoder and tiling) and :mod:`~gpfm_core.cohort.index`
(the cohort-wide similarity index: FAISS IVF-PQ candidates, exact centred re-rank). Nothing
heavy is imported until a name is used: ``import gpfm_core.cohort`` stays light (no
dask.distributed, torch, anndata, faiss).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it (imported on first use)
_LAZY: dict[str, str] = {
    "CohortEntry": "gpfm_core.cohort.manifest",
    "ManifestError": "gpfm_core.cohort.manifest",
    "read_cohort_inputs": "gpfm_core.cohort.manifest",
    "read_manifest": "gpfm_core.cohort.manifest",
    "CohortRun": "gpfm_core.cohort.run",
    "EmbedSettings": "gpfm_core.cohort.run",
    "SlideReport": "gpfm_core.cohort.run",
    "plan_cohort": "gpfm_core.cohort.run",
    "run_cohort": "gpfm_core.cohort.run",
    "TABLE_NAME": "gpfm_core.cohort.table",
    "read_table": "gpfm_core.cohort.table",
    "update_table": "gpfm_core.cohort.table",
    "Cohort": "gpfm_core.cohort.store",
    "CohortError": "gpfm_core.cohort.store",
    "open_cohort": "gpfm_core.cohort.store",
    "read_features": "gpfm_core.cohort.store",
    "export_anndata": "gpfm_core.cohort.h5ad",
    "FeatureFilesError": "gpfm_core.cohort.files",
    "FeatureGroup": "gpfm_core.cohort.files",
    "feature_group": "gpfm_core.cohort.files",
    "find_feature_files": "gpfm_core.cohort.files",
    "group_files": "gpfm_core.cohort.files",
    "DEFAULT_TRAIN_MIN": "gpfm_core.cohort.index",
    "CohortHit": "gpfm_core.cohort.index",
    "CohortIndex": "gpfm_core.cohort.index",
    "CohortIndexError": "gpfm_core.cohort.index",
    "IndexedSlide": "gpfm_core.cohort.index",
    "IndexFeeder": "gpfm_core.cohort.index",
    "IndexUpdate": "gpfm_core.cohort.index",
    "add_to_index": "gpfm_core.cohort.index",
    "build_index": "gpfm_core.cohort.index",
    "default_candidates": "gpfm_core.cohort.index",
    "default_index_dir": "gpfm_core.cohort.index",
    "feature_sets": "gpfm_core.cohort.index",
    "find_index": "gpfm_core.cohort.index",
    "index_dir_for": "gpfm_core.cohort.index",
    "index_group": "gpfm_core.cohort.index",
    "stale_files": "gpfm_core.cohort.index",
    "default_nprobe": "gpfm_core.cohort.index",
    "remove_from_index": "gpfm_core.cohort.index",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpfm_core.cohort' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
