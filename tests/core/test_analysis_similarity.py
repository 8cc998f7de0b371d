"""Cosine similarity, click-to-tile lookup, neighbourhood queries and top-k."""

from __future__ import annotations

import numpy as np
import pytest

from gpfm_core.analysis import (
    SimilarityIndex,
    cosine_similarity,
    neighbourhood_indices,
    neighbourhood_query,
    normalize_rows,
    query_from_point,
    top_k,
    top_k_multi,
)
from gpfm_core.errors import GpfmError


def test_normalize_rows_unit_norm_and_zero_rows() -> None:
    x = np.array([[3, 4, 0], [0, 0, 0], [1, 1, 1]], np.float32)
    n = normalize_rows(x)
    assert n.dtype == np.float32 and n.flags.c_contiguous
    assert np.allclose(np.linalg.norm(n, axis=1), [1, 0, 1], atol=1e-6)
    assert np.allclose(n[0], [0.6, 0.8, 0])
    x[2, 1] = np.inf
    with pytest.raises(GpfmError, match="NaN or inf"):
        normalize_rows(x)
    x[2, 1] = np.nan
    with pytest.raises(GpfmError, match="NaN or inf"):
        SimilarityIndex(x)


def test_cosine_matches_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    q = rng.normal(size=16).astype(np.float32)
    expected = (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    got = cosine_similarity(x, q)
    assert got.dtype == np.float32 and got.shape == (50,)
    assert np.allclose(got, expected, atol=1e-5)
    # scale invariance, and a tile is maximally similar to itself
    assert np.allclose(cosine_similarity(x * 7.0, q * 0.1), expected, atol=1e-5)
    assert np.isclose(cosine_similarity(x, x[3])[3], 1.0, atol=1e-5)


def test_multi_query_averages_unit_vectors() -> None:
    x = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
    index = SimilarityIndex(x)
    # (1, 0) and (0, 5) as unit vectors average to the 45° direction
    s = index.query(np.array([[1, 0], [0, 5]], np.float32))
    assert np.isclose(s[2], 1.0, atol=1e-6) and np.isclose(s[3], -np.sqrt(0.5), atol=1e-6)
    assert np.allclose(index.query_tiles([0, 1]), s)
    with pytest.raises(GpfmError, match="2-d"):
        index.query(np.ones(3, np.float32))
    with pytest.raises(GpfmError, match="zero"):
        index.query(np.array([[1, 0], [-1, 0]], np.float32))
    with pytest.raises(GpfmError, match="indices"):
        index.query_tiles(4)
    assert not index.normalized.flags.writeable


def test_query_from_point() -> None:
    coords = np.array([[0, 0], [100, 0], [0, 100], [300, 300]], np.int64)
    assert query_from_point(50, 50, coords, 100) == 0
    assert query_from_point(99.4, 0, coords, 100) == 0  # pixel 99 is still tile 0
    assert query_from_point(99.6, 0, coords, 100) == 1  # pixel 100 belongs to tile 1
    assert query_from_point(-0.5, 10, coords, 100) == 0
    assert query_from_point(-0.6, 10, coords, 100) is None
    assert query_from_point(150, 150, coords, 100) is None  # tile (100, 100) was not embedded
    assert query_from_point(350, 399, coords, 100) == 3
    assert query_from_point(np.nan, 0, coords, 100) is None


def test_query_from_point_overlap_prefers_nearest_centre() -> None:
    coords = np.array([[0, 0], [50, 0]], np.int64)  # 100-px tiles, 50-px stride
    assert query_from_point(60, 50, coords, 100) == 0  # centre 50 is nearer than 100
    assert query_from_point(80, 50, coords, 100) == 1


def test_neighbourhood_query_averages_existing_neighbours() -> None:
    grid_rc = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [5, 5]], np.int64)
    feats = np.eye(5, dtype=np.float32) * np.arange(1, 6, dtype=np.float32)[:, None]
    assert neighbourhood_indices(0, grid_rc, radius=1).tolist() == [0, 1, 2, 3]
    assert neighbourhood_indices(4, grid_rc, radius=1).tolist() == [4]
    q = neighbourhood_query(0, grid_rc, feats, radius=1)
    assert np.allclose(q, [0.5, 0.5, 0.5, 0.5, 0], atol=1e-6)  # unit vectors averaged
    assert np.allclose(neighbourhood_query(3, grid_rc, feats, radius=0), [0, 0, 0, 1, 0])
    with pytest.raises(GpfmError, match="outside"):
        neighbourhood_query(9, grid_rc, feats)


def test_top_k_sorted_ties_nan_exclude() -> None:
    s = np.array([0.1, 0.9, np.nan, 0.5, 0.9, 0.7], np.float32)
    idx, val = top_k(s, 3)
    assert idx.tolist() == [1, 4, 5] and np.allclose(val, [0.9, 0.9, 0.7])
    idx, _ = top_k(s, 2, exclude=np.array([1]))
    assert idx.tolist() == [4, 5]
    mask = np.zeros(6, bool)
    mask[[4, 5]] = True
    assert top_k(s, 2, exclude=mask)[0].tolist() == [1, 3]
    assert top_k(s, 100)[0].tolist() == [1, 4, 5, 3, 0]  # NaN never returned
    assert top_k(s, 1)[0].dtype == np.int64
    with pytest.raises(GpfmError, match="k must"):
        top_k(s, 0)


def test_top_k_matches_full_sort_on_random_scores() -> None:
    s = np.random.default_rng(2).random(10_000).astype(np.float32)
    idx, val = top_k(s, 25)
    ref = np.argsort(-s, kind="stable")[:25]
    assert idx.tolist() == ref.tolist() and np.array_equal(val, s[ref])


def test_top_k_multi_merges_slides() -> None:
    scores = {"b": np.array([0.2, 0.95, 0.4]), "a": np.array([0.95, 0.1]), "c": np.array([])}
    hits = top_k_multi(scores, 3)
    assert hits == [
        ("a", 0, pytest.approx(0.95)),
        ("b", 1, pytest.approx(0.95)),
        ("b", 2, pytest.approx(0.4)),
    ]
    assert len(top_k_multi(scores, 99)) == 5


@pytest.mark.parametrize(("precision", "max_err"), [("float16", 3e-4), ("bfloat16", 2e-3)])
def test_half_precision_index_close_to_exact(precision: str, max_err: float) -> None:
    rng = np.random.default_rng(5)
    centres = rng.normal(scale=0.6, size=(8, 1024))
    x = (centres[rng.integers(0, 8, 5000)] + rng.normal(size=(5000, 1024))).astype(np.float32)
    exact = SimilarityIndex(x)
    half = SimilarityIndex(x, precision=precision)
    assert half.n == 5000 and half.dim == 1024 and half.precision == precision
    for tile in (0, 17, 4999):
        ref, got = exact.query_tiles(tile), half.query_tiles(tile)
        assert got.dtype == np.float32 and got.shape == (5000,)
        assert np.abs(got - ref).max() <= max_err
        top_ref = set(top_k(ref, 100)[0].tolist())
        top_half = set(top_k(got, 100)[0].tolist())
        assert len(top_ref & top_half) >= 95
    q = x[[3, 9]]
    assert np.abs(half.query(q) - exact.query(q)).max() <= max_err
    assert np.abs(half.normalized - exact.normalized).max() <= 4 * max_err
    with pytest.raises(GpfmError, match="precision"):
        SimilarityIndex(x, precision="int8")


def _centred_unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    c = x.astype(np.float64) - mean
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def test_center_features_slide_or_given_mean() -> None:
    from gpfm_core.analysis import center_features

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(40, 12)) + 5.0).astype(np.float32)
    centred, mean = center_features(x)
    assert centred.dtype == np.float32 and mean.shape == (12,)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(centred.mean(axis=0), 0, atol=1e-5)
    cohort = np.full(12, 5.0, np.float32)
    np.testing.assert_allclose(center_features(x, mean=cohort)[0], x - 5.0, atol=1e-6)
    with pytest.raises(GpfmError, match=r"finite \(12,\)"):
        center_features(x, mean=np.zeros(3))


@pytest.mark.parametrize(
    ("dtype", "given"), [("float32", None), ("float16", None), ("float32", "cohort")]
)
def test_center_features_unit_is_the_one_centred_cosine(dtype: str, given: str | None) -> None:
    """unit=True gives the rows whose dot products are centred cosines, for every user:
    the dock's SimilarityIndex, the cohort index and the int8 fidelity check."""
    from gpfm_core.analysis import SimilarityIndex, center_features

    rng = np.random.default_rng(4)
    x = (rng.normal(size=(30, 16)) + 3.0).astype(dtype)
    mean = np.full(16, 3.0, np.float32) if given == "cohort" else None
    others = np.delete(x, 7, axis=0).astype(np.float64).mean(axis=0)
    x[7] = others if mean is None else mean  # a row at the mean (its own, or the cohort's)
    unit, mu = center_features(x, mean=mean, unit=True)
    ref = x.astype(np.float64) - mu
    norms = np.linalg.norm(ref, axis=1)
    ok = norms > 1e-3
    tol = 5e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(unit[ok], ref[ok] / norms[ok, None], atol=tol)
    if dtype == "float32":  # float16 rounds the row off the mean
        assert np.linalg.norm(unit[7]) < 1e-2  # (near) zero, not NaN: no direction to match
    assert np.isfinite(unit).all()
    index = SimilarityIndex(x, center=True if mean is None else mean)
    np.testing.assert_array_equal(index.normalized, unit)
    # NaN is refused by default and passed through with finite=False
    bad = x.astype(np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(GpfmError, match="NaN"):
        center_features(bad, unit=True)
    assert np.isnan(center_features(bad, mean=np.zeros(16), unit=True, finite=False)[0][0]).any()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_centred_index_matches_definition_and_crosses_slides(precision: str) -> None:
    rng = np.random.default_rng(4)
    common = rng.normal(size=16) * 20  # the shared component that makes raw cosine ~1
    a = (rng.normal(size=(60, 16)) + common).astype(np.float32)
    b = (rng.normal(size=(30, 16)) + common + 3.0).astype(np.float32)
    raw = SimilarityIndex(a).query_tiles(0)
    assert raw.min() > 0.9  # everything looks alike
    ia = SimilarityIndex(a, center=True, precision=precision)
    ib = SimilarityIndex(b, center=True, precision=precision)
    tol = 1e-5 if precision == "float32" else 4e-3
    ua, ub = _centred_unit(a, a.mean(axis=0)), _centred_unit(b, b.mean(axis=0))
    np.testing.assert_allclose(ia.mean, a.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(ia.query_tiles(0), ua @ ua[0], atol=tol)
    assert ia.query_tiles(0).min() < -0.3  # readable: unlike tiles score below zero
    # a raw feature vector is centred on the index's mean; a direction is used as it is
    np.testing.assert_allclose(ia.query(a[5]), ua @ ua[5], atol=tol)
    d = ia.direction([0, 1])
    expected = (ua[0] + ua[1]) / np.linalg.norm(ua[0] + ua[1])
    np.testing.assert_allclose(d, expected, atol=tol)
    np.testing.assert_allclose(ib.query(d, centred=True), ub @ expected, atol=tol)
    np.testing.assert_allclose(cosine_similarity(a, a[2], center=True), ua @ ua[2], atol=1e-5)
    # one tile that is the slide's average: one line, not a zero division
    flat = np.vstack([a[:1], a[:1]])
    with pytest.raises(GpfmError, match="average tile"):
        SimilarityIndex(flat, center=True).query_tiles(0)
