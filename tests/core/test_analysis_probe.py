"""LinearProbe: fit, report, predict, safe save / load and applying to another slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpfm_core.analysis import LinearProbe, ProbeProvenanceWarning
from gpfm_core.errors import GpfmError

NAMES = ["tumour", "stroma", "necrosis"]


def _data(n: int = 600, d: int = 32, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.5, size=(c, d))
    y = rng.integers(0, c, n)
    x = centres[y] + rng.normal(size=(n, d)) + 10.0  # offset: standardisation must matter
    return x.astype(np.float32), y.astype(np.int64)


def test_fit_report_and_predict() -> None:
    x, y = _data()
    probe = LinearProbe(encoder="test-enc")
    report = probe.fit(x[:400], y[:400], class_names=NAMES)
    assert report.n_per_class == {n: int((y[:400] == i).sum()) for i, n in enumerate(NAMES)}
    assert report.cv_folds == 5 and report.note == ""
    assert report.cv_balanced_accuracy is not None and report.cv_balanced_accuracy > 0.9
    assert report.train_balanced_accuracy >= report.cv_balanced_accuracy - 0.05
    proba = probe.predict_proba(x[400:])
    assert proba.shape == (200, 3) and proba.dtype == np.float32
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    labels, conf = probe.predict(x[400:])
    assert np.mean(labels == y[400:]) > 0.9
    assert np.allclose(conf, proba.max(axis=1))


def _overlapping(n: int, d: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes (accuracy well below 1), unequal class sizes, offset features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.12, size=(c, d))
    y = rng.choice(c, n, p=np.arange(1, c + 1) / np.arange(1, c + 1).sum())
    x = centres[y] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + 3.0
    return x.astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_converged_probe_matches_sklearn(solver: str) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _data(seed=1)
    probe = LinearProbe(max_iter=2000, tol=1e-6, solver=solver)
    probe.fit(x, y, class_names=NAMES, cv_folds=0)
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(class_weight="balanced", max_iter=2000, tol=1e-8).fit(
        scaler.transform(x), y
    )
    assert np.allclose(probe.predict_proba(x), ref.predict_proba(scaler.transform(x)), atol=1e-3)


@pytest.mark.parametrize("c", [2, 4])
def test_default_torch_fit_agrees_with_sklearn_on_held_out_tiles(c: int) -> None:
    x, y = _overlapping(n=6000, d=256, c=c, seed=c)
    names = [f"class{i}" for i in range(c)]
    train, test = slice(0, 3000), slice(3000, None)
    fast = LinearProbe()  # torch L-BFGS, float32
    ref = LinearProbe(solver="sklearn")
    rep_fast = fast.fit(x[train], y[train], class_names=names, cv_folds=3)
    rep_ref = ref.fit(x[train], y[train], class_names=names, cv_folds=3)
    lab_fast, _ = fast.predict(x[test])
    lab_ref, _ = ref.predict(x[test])
    assert np.mean(lab_fast == lab_ref) >= 0.99
    acc = np.mean(lab_ref == y[test])
    assert 0.6 < acc < 0.99  # a realistic, not separable, problem
    assert rep_fast.cv_balanced_accuracy == pytest.approx(rep_ref.cv_balanced_accuracy, abs=0.02)
    assert np.abs(fast.predict_proba(x[test]) - ref.predict_proba(x[test])).max() < 0.1


def test_predict_folds_standardisation_exactly() -> None:
    x, y = _data(seed=4)
    probe = LinearProbe()
    probe.fit(x, y, class_names=NAMES, cv_folds=0)
    assert probe.coef_ is not None and probe.intercept_ is not None
    z = ((x.astype(np.float64) - probe.mean_) / probe.scale_) @ probe.coef_.T.astype(np.float64)
    z += probe.intercept_
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    got = probe.predict_proba(x)
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-5
    with pytest.raises(GpfmError, match="solver"):
        LinearProbe(solver="newton").fit(x, y, class_names=NAMES, cv_folds=0)


def test_unlabelled_ignored_binary_and_absent_class() -> None:
    x, y = _data(c=2, seed=2)
    y = y.copy()
    y[::3] = -1
    probe = LinearProbe()
    report = probe.fit(x, y, class_names=["a", "b", "never drawn"], cv_folds=3)
    assert report.n_per_class["never drawn"] == 0
    assert sum(report.n_per_class.values()) == int((y >= 0).sum())
    proba = probe.predict_proba(x)
    assert proba.shape == (600, 3) and np.all(proba[:, 2] == 0)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)


def test_cv_reduced_or_skipped_with_few_samples() -> None:
    x, _ = _data(n=10)
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    report = LinearProbe().fit(x, y, class_names=["a", "b"], cv_folds=5)
    assert report.cv_folds == 3 and "3 tiles" in report.note
    y1 = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    report = LinearProbe().fit(x, y1, class_names=["a", "b"])
    assert report.cv_balanced_accuracy is None and "only 1" in report.note


def test_errors() -> None:
    x, y = _data()
    probe = LinearProbe()
    with pytest.raises(GpfmError, match="no labelled tiles"):
        probe.fit(x, np.full(600, -1), class_names=NAMES)
    with pytest.raises(GpfmError, match="at least two classes"):
        probe.fit(x, np.where(y == 0, 0, -1), class_names=NAMES)
    with pytest.raises(GpfmError, match="labels must lie"):
        probe.fit(x, y + 1, class_names=NAMES)
    with pytest.raises(GpfmError, match="not trained"):
        probe.predict(x)
    probe.fit(x, y, class_names=NAMES, cv_folds=0)
    with pytest.raises(GpfmError, match="32-d"):
        probe.predict(x[:, :16])
    x_bad = x.copy()
    x_bad[5, 3] = np.nan
    with pytest.raises(GpfmError, match="NaN or inf"):
        probe.predict(x_bad)
    with pytest.raises(GpfmError, match="NaN or inf"):
        probe.fit(x_bad, y, class_names=NAMES)


def test_apply_to_another_slide_via_file(tmp_path: Path) -> None:
    x, y = _data(n=800, d=48, seed=3)
    probe = LinearProbe(encoder="gpfm", class_colours=[(255, 0, 0), (0, 128, 0), (0, 0, 255)])
    probe.fit(x[:400], y[:400], class_names=NAMES, cv_folds=3)
    path = probe.save(tmp_path / "probe.safetensors")
    assert path.is_file() and not list(tmp_path.glob("*.tmp-*"))
    loaded = LinearProbe.load(path, embed_dim=48)
    assert loaded.class_names == NAMES and loaded.encoder == "gpfm"
    assert loaded.class_colours == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    assert loaded.report_ == probe.report_
    lab_a, conf_a = probe.predict(x[400:])
    lab_b, conf_b = loaded.predict(x[400:])
    assert np.array_equal(lab_a, lab_b) and np.array_equal(conf_a, conf_b)
    with pytest.raises(GpfmError, match="48-d"):
        LinearProbe.load(path, embed_dim=1024)


def test_saved_file_is_safetensors_without_pickle(tmp_path: Path) -> None:
    from safetensors import safe_open

    x, y = _data()
    path = tmp_path / "p.safetensors"
    probe = LinearProbe(encoder="e")
    probe.fit(x, y, class_names=NAMES, cv_folds=0)
    probe.save(path)
    with safe_open(str(path), framework="numpy") as fh:
        keys = set(fh.keys())
        meta = json.loads(fh.metadata()["gpfm_probe"])
    assert keys == {"coef", "intercept", "scaler_mean", "scaler_scale", "classes"}
    assert meta["embed_dim"] == 32 and meta["class_names"] == NAMES and meta["created"]
    assert b"pickle" not in path.read_bytes()


def test_load_rejects_damaged_or_foreign_files(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(GpfmError, match="not a gpfm probe"):
        LinearProbe.load(junk)
    with pytest.raises(GpfmError, match="not found"):
        LinearProbe.load(tmp_path / "missing.safetensors")
    # valid safetensors with inconsistent shapes
    bad = tmp_path / "bad.safetensors"
    meta = {
        "format": "gpfm-linear-probe",
        "format_version": 1,
        "class_names": ["a", "b"],
        "embed_dim": 4,
    }
    tensors = {
        "coef": np.zeros((2, 5), np.float32),
        "intercept": np.zeros(2, np.float32),
        "scaler_mean": np.zeros(4, np.float32),
        "scaler_scale": np.ones(4, np.float32),
        "classes": np.array([0, 1], np.int64),
    }
    save_file(tensors, str(bad), metadata={"gpfm_probe": json.dumps(meta)})
    with pytest.raises(GpfmError, match="damaged"):
        LinearProbe.load(bad)
    tensors["coef"] = np.zeros((2, 4), np.float32)
    save_file(tensors, str(bad), metadata={"gpfm_probe": json.dumps(meta)})
    with pytest.warns(ProbeProvenanceWarning):  # its header predates weights and tiling
        assert LinearProbe.load(bad).embed_dim == 4
    save_file(tensors, str(bad), metadata={"gpfm_probe": json.dumps({**meta, "format": "other"})})
    with pytest.raises(GpfmError, match="damaged or foreign"):
        LinearProbe.load(bad)


# ---------------------------------------------------------------- honest cross-validation
def _field(seed: int, *, side: int = 48, d: int = 16, sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Tile features of a smooth random field on a side x side grid: neighbours look alike.

    Returns features (side², d) float32 and grid_rc (side², 2).
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(side, side, d)), sigma=(sigma, sigma, 0))
    x = field.reshape(-1, d) / field.std() + 0.3 * rng.normal(size=(side * side, d))
    r, c = np.mgrid[0:side, 0:side]
    return x.astype(np.float32), np.stack([r.ravel(), c.ravel()], axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_labels_per_annotation_score_chance(seed: int) -> None:
    """Labels that carry no tissue information: 144 square annotations of 4x4 tiles, each
    given a random class. Split tile by tile, neighbours of a held-out tile sit in the
    training fold with its label (0.60 on average over 40 seeds, never below 0.54);
    grouped by annotation the score is chance (0.50 +- 0.04 over 40 seeds, all within
    0.36-0.57: the tolerance below holds for any seed)."""
    x, rc = _field(seed)
    ann = (rc[:, 0] // 4) * 12 + rc[:, 1] // 4
    y = np.random.default_rng(100 + seed).integers(0, 2, 144)[ann]
    grouped = LinearProbe().fit(x, y, class_names=["a", "b"], groups=ann, grid_rc=rc)
    assert grouped.cv_folds == 5 and grouped.cv_groups == 144
    assert "grouped by annotation" in grouped.cv_scheme and "scaler fitted" in grouped.cv_scheme
    assert grouped.cv_balanced_accuracy is not None
    assert abs(grouped.cv_balanced_accuracy - 0.5) <= 0.15
    leaky = LinearProbe().fit(x, y, class_names=["a", "b"])  # no annotations: tile by tile
    assert "optimistic" in leaky.cv_scheme and leaky.cv_groups == 0
    assert leaky.cv_balanced_accuracy >= grouped.cv_balanced_accuracy + 0.03


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_annotation_per_class_is_cut_into_blocks(seed: int) -> None:
    """The issue's leaky example: one annotation per class (the left and right halves of a
    field with no tissue difference). Split tile by tile it reported 0.67 (here 0.64 on
    average over 30 seeds, 0.58-0.70); cut into 16x16-tile blocks it is chance (0.51 over
    30 seeds, 0.39-0.59, so the tolerance holds for any seed)."""
    x, rc = _field(seed, side=64)
    y = (rc[:, 1] >= 32).astype(np.int64)
    report = LinearProbe().fit(x, y, class_names=["left", "right"], groups=y, grid_rc=rc)
    assert "'left', 'right' drawn once, cut into 16x16-tile blocks" in report.cv_scheme
    assert report.cv_folds == 5 and report.cv_groups == 16  # 4 x 2 blocks per class
    assert abs(report.cv_balanced_accuracy - 0.5) <= 0.15
    leaky = LinearProbe().fit(x, y, class_names=["left", "right"])
    assert leaky.cv_balanced_accuracy >= 0.55


def _blocks(rows: int, cols: int, r0: int = 0, c0: int = 0) -> np.ndarray:
    r, c = np.mgrid[r0 : r0 + rows, c0 : c0 + cols]
    return np.stack([r.ravel(), c.ravel()], axis=1)


@pytest.mark.parametrize(
    ("case", "folds", "n_groups", "scheme", "note"),
    [
        ("six annotations each", 5, 12, "5-fold CV grouped by annotation", ""),
        ("two annotations of b", 2, 8, "2-fold CV grouped by annotation", "'b' has 2 annotations"),
        ("one big annotation each", 5, 18, "cut into 16x16-tile blocks", ""),
        ("one small annotation each", 5, 18, "cut into 2x2-tile blocks", ""),
        ("one tile of b", 0, None, "", "'b' has one annotation of 1 tile(s)"),
        ("no annotations given", 5, 0, "tiles split at random", ""),
        ("one group id for both classes", 2, 4, "2-fold CV grouped by annotation", "2 annotations"),
    ],
)
def test_plan_cv_cases(case: str, folds: int, n_groups: int | None, scheme: str, note: str) -> None:
    from gpfm_core.analysis import plan_cv

    groups: np.ndarray | None
    if case in ("six annotations each", "two annotations of b", "one group id for both classes"):
        nb = {"six annotations each": 6, "two annotations of b": 2}.get(case, 2)
        na = 6 if case != "one group id for both classes" else 2
        y = np.repeat([0] * na + [1] * nb, 10)
        groups = np.repeat(np.arange(na + nb), 10)
        if case == "one group id for both classes":
            groups = np.repeat([0, 1, 0, 1], 10)  # group ids reused across classes
        rc = None
    elif case.startswith("one big") or case.startswith("one small"):
        side = 48 if "big" in case else 6
        rc = np.vstack([_blocks(side, side), _blocks(side, side, 0, 112)])
        y = np.repeat([0, 1], side * side)
        groups = y.copy()
    elif case == "one tile of b":
        rc = np.vstack([_blocks(6, 6), _blocks(1, 1, 0, 50)])
        y = np.array([0] * 36 + [1])
        groups = y.copy()
    else:
        y, groups, rc = np.repeat([0, 1], 20), None, None
    plan = plan_cv(y, groups=groups, grid_rc=rc, cv_folds=5, class_names=["a", "b"])
    assert plan.folds == folds and scheme in plan.scheme and note in plan.note
    if n_groups is not None:
        assert plan.n_groups == n_groups
    if plan.groups is not None:  # no group straddles two classes
        for g in np.unique(plan.groups):
            assert np.unique(y[plan.groups == g]).size == 1


def test_probe_file_records_the_weights_and_tiling_and_older_files_warn(tmp_path: Path) -> None:
    import warnings

    from _probe_files import write_older_probe

    x, y = _data(n=300, d=16, seed=5)
    tiling = {"requested_mpp": np.float64(0.5), "tile_px": np.int64(112), "overlap_px": 0}
    probe = LinearProbe(encoder="gpfm", weights_hash="ab" * 32, tiling=tiling)
    probe.fit(x, y, class_names=NAMES, cv_folds=0)
    path = probe.save(tmp_path / "p.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file that records them loads without a warning
        loaded = LinearProbe.load(path)
    assert loaded.weights_hash == "ab" * 32
    assert loaded.tiling == {"requested_mpp": 0.5, "tile_px": 112, "overlap_px": 0}
    # a file written before they were recorded: loads, and says what cannot be checked
    old = write_older_probe(path, tmp_path / "old.safetensors")
    with pytest.warns(ProbeProvenanceWarning, match="only the encoder name \\(gpfm\\)") as rec:
        older = LinearProbe.load(old)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert older.weights_hash is None and older.tiling is None
    np.testing.assert_array_equal(older.predict(x)[0], probe.predict(x)[0])
