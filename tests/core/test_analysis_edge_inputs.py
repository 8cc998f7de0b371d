"""Every public analysis function on the smallest input it accepts, identical rows, and NaN.

Each gives a result (checked here) or one clear :class:`GpfmError` (one line, naming a way
out), never a raw exception from numpy, scikit-learn, umap-learn, torch or shapely. The
table has one row per function and input kind, with the outcome expected: ``"ok"`` (and a
check of the result) or the start of the error message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import Polygon

import gpfm_core.analysis as A
from gpfm_core.analysis.knn import exact_knn, ivf_knn
from gpfm_core.errors import GpfmError

T = 100
NAN = "contain"  # "features contain(s) NaN or inf: ..."


def _x(kind: str, n: int, d: int = 8) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    if kind == "identical":
        x[:] = x[0]
    elif kind == "nan":
        x[n // 2, 0] = np.nan
    return x


def _rc(kind: str, n: int) -> np.ndarray:
    rc = np.stack([np.zeros(n, np.int64), np.arange(n)], axis=1)
    return np.zeros_like(rc) if kind == "identical" else rc


def _xy(kind: str, n: int) -> np.ndarray:
    xy = (_rc(kind, n)[:, ::-1] * T).astype(np.float64)
    if kind == "nan":
        xy[0, 0] = np.nan
    return xy


def _scores(kind: str, n: int) -> np.ndarray:
    s = np.linspace(0, 1, n, dtype=np.float32)
    if kind == "identical":
        s[:] = 0.5
    elif kind == "nan":
        s[0] = np.nan
    return s


def _y(kind: str, n: int) -> np.ndarray:
    return np.zeros(n, np.int64) if kind == "identical" else np.arange(n) % 2


def _geojson(kind: str, tmp: Path) -> Path:
    ring = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    if kind == "nan":
        ring[1] = [float("nan"), 0]
    feat = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation"}}  # fmt: skip
    feats = {"min": [], "identical": [feat, feat], "nan": [feat]}[kind]
    path = tmp / f"{kind}.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _probe(kind: str, n: int) -> Any:
    probe = A.LinearProbe()
    probe.fit(_x("random", 4), np.array([0, 1, 0, 1]), class_names=["a", "b"], cv_folds=0)
    return probe.predict(_x(kind, n))


def _finite(out: Any) -> bool:
    arrays = out if isinstance(out, tuple) else (out,)
    return all(np.isfinite(np.asarray(a, dtype=float)).all() for a in arrays)


# name -> (smallest n its docstring allows, call(kind, n, tmp), {kind: "ok" | error start},
#          check of an "ok" result)
CASES: dict[str, tuple[int, Callable[..., Any], dict[str, str], Callable[[Any, int], bool]]] = {
    "center_features": (
        1, lambda k, n, t: A.center_features(_x(k, n)),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out[0].shape == (n, 8) and not out[0].any(),  # one tile / identical rows
    ),
    "normalize_rows": (
        1, lambda k, n, t: A.normalize_rows(_x(k, n)),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5),
    ),
    "cosine_similarity": (
        1, lambda k, n, t: A.cosine_similarity(_x(k, n), _x("random", 1)[0]),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out.shape == (n,) and _finite(out),
    ),
    "cosine_similarity(center)": (
        2, lambda k, n, t: A.cosine_similarity(_x(k, n), _x(k, n)[0], center=True),
        {"min": "ok", "identical": "the query equals the slide's average tile", "nan": NAN},
        lambda out, n: np.allclose(out, [1, -1]),  # two tiles: each other's opposite
    ),
    "SimilarityIndex.query_tiles": (
        1, lambda k, n, t: A.SimilarityIndex(_x(k, n)).query_tiles(0),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: np.allclose(out, 1, atol=1e-5) if n == 1 else out.shape == (n,),
    ),
    "SimilarityIndex(center).query_tiles": (
        2, lambda k, n, t: A.SimilarityIndex(_x(k, n), center=True).query_tiles(0),
        {"min": "ok", "identical": "the query equals the slide's average tile", "nan": NAN},
        lambda out, n: np.allclose(out, [1, -1], atol=1e-5),
    ),
    "neighbourhood_query": (
        1, lambda k, n, t: A.neighbourhood_query(0, _rc("random", n), _x(k, n)),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: np.isclose(np.linalg.norm(out), 1, atol=1e-5),
    ),
    "neighbourhood_indices": (
        1, lambda k, n, t: A.neighbourhood_indices(0, _rc(k, n)),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: out[0] == 0 and out.size <= n,
    ),
    "query_from_point": (
        1, lambda k, n, t: A.query_from_point(*(_xy(k, 1)[0] + 5), _xy("random", n).astype(np.int64), T),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: out in (0, None),  # NaN point: outside every tile
    ),
    "top_k": (
        1, lambda k, n, t: A.top_k(_scores(k, n), 3),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: out[0].size == min(3, n) and _finite(out[1]),  # NaN never ranks
    ),
    "top_k_multi": (
        1, lambda k, n, t: A.top_k_multi({"a": _scores(k, n)}, 3),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: all(np.isfinite(s) for _, _, s in out),  # NaN never ranks
    ),
    "order_by_size": (
        1, lambda k, n, t: A.order_by_size(_y(k, n)),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: out.shape == (n,) and out.min() >= 0,
    ),
    "kmeans_clusters": (
        2, lambda k, n, t: A.kmeans_clusters(_x(k, n), 2),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out.shape == (n,) and set(out.tolist()) <= {0, 1},
    ),
    "density_clusters": (
        2, lambda k, n, t: A.density_clusters(_x(k, n, 2), min_cluster_size=2),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out.shape == (n,) and out.max() < n,
    ),
    "pca_reduce": (
        1, lambda k, n, t: A.pca_reduce(_x(k, n)),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out.shape[0] == n and _finite(out),
    ),
    "umap_embed": (
        4, lambda k, n, t: A.umap_embed(_x(k, n), n_neighbors=3),
        {"min": "ok", "identical": "all 6 tiles have identical features", "nan": NAN},
        lambda out, n: out.shape == (n, 2) and _finite(out),
    ),
    "exact_knn": (
        1, lambda k, n, t: exact_knn(_x(k, n), 2),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out[0].shape[0] == n and (out[0][:, 0] == np.arange(n)).all(),
    ),
    "ivf_knn": (
        1, lambda k, n, t: ivf_knn(_x(k, n), 2),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out[0].shape[0] == n and _finite(out[1]),
    ),
    "LinearProbe.fit": (
        2, lambda k, n, t: A.LinearProbe().fit(_x(k, n), np.arange(n) % 2, class_names=["a", "b"]),
        {"min": "ok", "identical": "ok", "nan": NAN},
        # two tiles: no CV ("only 1" tile per class); identical rows: chance, nothing learnt
        lambda out, n: (out.cv_balanced_accuracy is None) == (n == 2)
        and out.train_balanced_accuracy == 0.5 if n > 2 else "only 1" in out.note,
    ),
    "LinearProbe.predict": (
        1, lambda k, n, t: _probe(k, n),
        {"min": "ok", "identical": "ok", "nan": NAN},
        lambda out, n: out[0].shape == (n,) and _finite(out[1]),
    ),
    "plan_cv": (
        2, lambda k, n, t: A.plan_cv(_y(k, n), groups=_y("random", n), cv_folds=5),
        {"min": "ok", "identical": "y must be a 1-D integer array with at least two", "nan": "ok"},
        lambda out, n: out.folds == 0 or out.folds >= 2,
    ),
    "labels_for_shapes": (
        1, lambda k, n, t: A.labels_for_shapes([Polygon([(0, 0), (60, 0), (60, 60)])], [0], _xy(k, n), T),
        {"min": "ok", "identical": "ok", "nan": "coords must hold whole numbers"},
        lambda out, n: out.labels.shape == (n,) and out.labels[0] == 0,
    ),
    "tiles_to_raster": (
        1, lambda k, n, t: A.tiles_to_raster(_scores(k, n), _rc(k, n), (1, n)),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: out.shape == (1, n),
    ),
    "tile_layer_placement": (
        1, lambda k, n, t: A.tile_layer_placement(stride_level0=n, mpp=np.nan if k == "nan" else 0.5),
        {"min": "ok", "identical": "ok", "nan": "mpp must be positive"},
        lambda out, n: _finite(out),
    ),
    "predictions_to_geojson": (
        1, lambda k, n, t: A.predictions_to_geojson(_xy("random", n).astype(np.int64), T, _y(k, n), ["a", "b"],
                                                    confidence=_scores(k, n), path=t / "p.geojson"),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: len(out["features"]) == n,  # NaN confidence is left out, JSON has no NaN
    ),
    "predictions_to_geojson(merge)": (
        1, lambda k, n, t: A.predictions_to_geojson(_xy("random", n).astype(np.int64), T, _y(k, n), ["a", "b"],
                                                    merge=True),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: 1 <= len(out["features"]) <= 2,
    ),
    "predictions_to_csv": (
        1, lambda k, n, t: A.predictions_to_csv(_xy("random", n).astype(np.int64), _y(k, n), _scores(k, n),
                                                ["a", "b"], path=t / "p.csv", tile_size_level0=T),
        {"min": "ok", "identical": "ok", "nan": "ok"},
        lambda out, n: len(out.read_text().splitlines()) == n + 1,
    ),
    "shapes_to_geojson": (
        1, lambda k, n, t: A.shapes_to_geojson([np.add(_xy(k, 3), [[0, 0], [0, 0], [0, 50]])] * n, ["a"] * n),
        {"min": "ok", "identical": "ok", "nan": "polygon must be a finite"},
        lambda out, n: len(out["features"]) == n,
    ),
    "annotations_to_geojson": (
        1, lambda k, n, t: A.annotations_to_geojson(
            [A.Annotation(Polygon([(0, 0), (np.nan if k == "nan" else 1, 0), (1, 1)]), "a")] * n),
        {"min": "ok", "identical": "ok", "nan": "annotation 'a' has NaN"},
        lambda out, n: len(out["features"]) == n,
    ),
    "read_qupath_geojson": (
        0, lambda k, n, t: A.read_qupath_geojson(_geojson(k, t)),
        {"min": "ok", "identical": "ok", "nan": "nan.geojson: feature #1 has NaN"},
        lambda out, n: len(out.annotations) in (0, 2),
    ),
}


@pytest.mark.parametrize("kind", ["min", "identical", "nan"])
@pytest.mark.parametrize("name", list(CASES))
def test_smallest_identical_and_nan_inputs(name: str, kind: str, tmp_path: Path) -> None:
    n_min, call, expected, check = CASES[name]
    n = {"min": n_min, "identical": max(n_min, 6), "nan": max(n_min, 6)}[kind]
    want = expected[kind]
    if want == "ok":
        out = call(kind, n, tmp_path)
        assert check(out, n), out
    else:
        with pytest.raises(GpfmError) as info:
            call(kind, n, tmp_path)
        message = str(info.value)
        assert want in message and "\n" not in message, message
