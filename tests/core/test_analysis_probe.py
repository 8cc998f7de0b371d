"""LinearProbe: fit, report, predict, safe save / load and applying to another slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpfm_core.analysis import LinearProbe
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
    assert LinearProbe.load(bad).embed_dim == 4
    save_file(tensors, str(bad), metadata={"gpfm_probe": json.dumps({**meta, "format": "other"})})
    with pytest.raises(GpfmError, match="damaged or foreign"):
        LinearProbe.load(bad)
