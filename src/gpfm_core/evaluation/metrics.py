"""Classification and survival metrics, with bootstrap confidence intervals.

Point estimates come from scikit-learn (``balanced_accuracy_score``, ``f1_score(average=
"macro")``, one-vs-rest ``roc_auc_score`` averaged over classes) and lifelines
(``concordance_index``). Their 95 % intervals come from a percentile bootstrap over test items
(1000 resamples by default, as the GPFM paper reports them).

Why the bootstrap does not call scikit-learn 1000 times: a resample of ``n`` items is the
same as giving item ``i`` the weight ``w_i`` = how often it was drawn. All three metrics are
sums over items, so every resample is one row of a count matrix ``W`` (B, n) and each metric
is a few matrix products over it (AUROC: one sort of the scores, then weighted cumulative
sums). 1000 resamples x 2,000 items x 9 classes take a fraction of a second instead of a
minute. A test checks that unit weights reproduce scikit-learn's value exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpfm_core.errors import GpfmError

__all__ = [
    "CLASSIFICATION_METRICS",
    "Estimate",
    "bootstrap_counts",
    "bootstrap_indices",
    "classification_metrics",
    "classification_with_ci",
    "concordance",
    "concordance_with_ci",
    "fast_classification_metrics",
    "weighted_classification",
]

#: Metric names, in report order.
CLASSIFICATION_METRICS = ("balanced_accuracy", "f1_macro", "auroc_macro")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95 % interval (NaN when not computed)."""

    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    sd: float = float("nan")  # spread over repeats or folds, when the value is their mean

    def as_dict(self) -> dict[str, float]:
        """``{"value", "ci_low", "ci_high", "sd"}``."""
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "sd": self.sd}


def _check(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise GpfmError(
            f"y_true must be (N,) and proba (N, K); got {y.shape} and {p.shape}: one row per item"
        )
    if p.shape[1] < 2:
        raise GpfmError("proba must have at least two class columns")
    if y.size == 0:
        raise GpfmError("no test items: every split needs items")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise GpfmError(f"y_true must hold class indices 0..{p.shape[1] - 1}")
    return y.astype(np.int64), p


def _auc_classes(y: np.ndarray, k: int) -> list[int]:
    """Classes whose one-vs-rest AUROC is averaged: binary tasks the positive class only
    (scikit-learn's binary AUROC), else every class with positives and negatives."""
    candidates = [1] if k == 2 else range(k)
    return [c for c in candidates if 0 < int((y == c).sum()) < y.size]


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, macro-F1 and macro-AUROC (scikit-learn).

    Parameters
    ----------
    y_true
        (N,) int class indices.
    proba
        (N, K) class scores (probabilities); the prediction is the arg-max.

    Returns
    -------
    dict
        ``balanced_accuracy``, ``f1_macro``, ``auroc_macro``. AUROC is one-vs-rest,
        averaged over the classes that have positives and negatives among the items; for
        two classes it is the binary AUROC of class 1. NaN when undefined.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    y, p = _check(y_true, proba)
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():  # a small test set may lack a predicted class: expected
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        bal = float(balanced_accuracy_score(y, pred))
    aucs = [roc_auc_score(y == c, p[:, c]) for c in _auc_classes(y, p.shape[1])]
    return {
        "balanced_accuracy": bal,
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "auroc_macro": float(np.mean(aucs)) if aucs else float("nan"),
    }


def fast_classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """:func:`classification_metrics` without scikit-learn's per-call overhead (~10 ms).

    The unit-weight case of :func:`weighted_classification` (a test checks it equals
    scikit-learn's values); used inside loops (early stopping, few-shot repeats).
    """
    y, p = _check(y_true, proba)
    return {m: float(v[0]) for m, v in weighted_classification(y, p, np.ones((1, y.size))).items()}


def bootstrap_counts(n: int, *, n_resamples: int, seed: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each resample -> (n_resamples, n) float64."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    draws += np.arange(n_resamples)[:, None] * n
    return (
        np.bincount(draws.ravel(), minlength=n_resamples * n)
        .reshape(n_resamples, n)
        .astype(np.float64)
    )


def bootstrap_indices(n: int, *, n_resamples: int, seed: int) -> np.ndarray:
    """Resampled item indices (n_resamples, n) int64, drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _weighted_auroc(w: np.ndarray, pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUROC of ``score`` for ``pos`` under item weights ``w`` (B, n) -> (B,) (ties count 1/2).

    Items are sorted by score once and their weights summed per group of equal scores; the
    AUROC is then ``sum_g Wpos_g * (Wneg below g + Wneg_g / 2) / (Wpos * Wneg)``.
    """
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ws = w[:, order]
    pos_o = pos[order]
    wpos, wneg = ws * pos_o, ws * ~pos_o
    if starts.size < s.size:  # ties: one column per group of equal scores -> (B, G)
        wpos = np.add.reduceat(wpos, starts, axis=1)
        wneg = np.add.reduceat(wneg, starts, axis=1)
    below = np.cumsum(wneg, axis=1) - wneg
    num = (wpos * (below + 0.5 * wneg)).sum(axis=1)
    den = wpos.sum(axis=1) * wneg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_classification(
    y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """The three metrics of :func:`classification_metrics` under item weights.

    Parameters
    ----------
    y_true, proba
        As :func:`classification_metrics`.
    weights
        (B, N) non-negative item weights, one row per resample (bootstrap counts).

    Returns
    -------
    dict
        Metric name -> (B,) float64 (NaN where a resample leaves it undefined).
    """
    y, p = _check(y_true, proba)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != y.size:
        raise GpfmError(f"weights must be (B, {y.size}), got {w.shape}")
    k = p.shape[1]
    pred = p.argmax(axis=1)
    onehot_y = np.eye(k)[y]
    onehot_p = np.eye(k)[pred]
    support = w @ onehot_y  # (B, K)
    predicted = w @ onehot_p
    tp = w @ (onehot_y * onehot_p)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            bal = np.nanmean(recall, axis=1)
        present = (support + predicted) > 0  # scikit-learn's labels: seen in y or pred
        f1 = np.where(present, 2 * tp / np.where(present, support + predicted, 1), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f1_macro = np.nanmean(f1, axis=1)
    aucs = np.full((w.shape[0], k), np.nan)
    for c in _auc_classes(y, k):
        aucs[:, c] = _weighted_auroc(w, y == c, p[:, c])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        auc = np.nanmean(aucs, axis=1)
    return {"balanced_accuracy": bal, "f1_macro": f1_macro, "auroc_macro": auc}


def _percentile_ci(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def classification_with_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    block: int = 250,
) -> dict[str, Estimate]:
    """:func:`classification_metrics` with percentile-bootstrap 95 % intervals.

    Parameters
    ----------
    y_true, proba
        As :func:`classification_metrics`.
    n_resamples
        Bootstrap resamples (0: no interval).
    seed
        Seed of the resampling: the same seed gives the same interval.
    block
        Resamples per step (bounds memory: ``block x N`` float64 per array).

    Returns
    -------
    dict
        Metric name -> :class:`Estimate`.
    """
    y, p = _check(y_true, proba)
    point = classification_metrics(y, p)
    if n_resamples <= 0:
        return {m: Estimate(v) for m, v in point.items()}
    counts = bootstrap_counts(y.size, n_resamples=n_resamples, seed=seed)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in point}
    for start in range(0, n_resamples, block):
        for m, v in weighted_classification(y, p, counts[start : start + block]).items():
            parts[m].append(v)
    return {m: Estimate(point[m], *_percentile_ci(np.concatenate(parts[m]))) for m in point}


def _survival_arrays(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, dtype=np.float64)
    if not (t.shape == e.shape == r.shape) or t.ndim != 1:
        raise GpfmError("time, event and risk must be 1-D arrays of the same length")
    if not e.any():
        raise GpfmError("no uncensored item: the c-index needs at least one observed event")
    return t, e, r


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index of a risk score (lifelines ``concordance_index``).

    Parameters
    ----------
    time
        (N,) follow-up time (e.g. ``survival_months``).
    event
        (N,) bool, True when the event was observed (``censorship == 0``).
    risk
        (N,) predicted risk: higher means an earlier event.

    Returns
    -------
    float
        In [0, 1]; 0.5 is chance.
    """
    from lifelines.utils import concordance_index

    t, e, r = _survival_arrays(time, event, risk)
    # lifelines scores survival (higher = longer): pass the negated risk
    return float(concordance_index(t, -r, e))


def concordance_with_ci(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Estimate:
    """:func:`concordance` with a percentile-bootstrap 95 % interval over items."""
    from lifelines.utils import concordance_index

    t, e, r = _survival_arrays(time, event, risk)
    point = concordance(t, e, r)
    if n_resamples <= 0:
        return Estimate(point)
    samples = []
    for idx in bootstrap_indices(t.size, n_resamples=n_resamples, seed=seed):
        if e[idx].any():
            try:
                samples.append(concordance_index(t[idx], -r[idx], e[idx]))
            except ZeroDivisionError:  # no admissible pair in this resample
                continue
    return Estimate(point, *_percentile_ci(np.asarray(samples)))


def summarise(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
