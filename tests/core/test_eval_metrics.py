"""Metrics of the evaluation: scikit-learn / lifelines values, bootstrap intervals, survival."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from gpfm_core.errors import GpfmError
from gpfm_core.evaluation.metrics import (
    bootstrap_counts,
    classification_metrics,
    classification_with_ci,
    concordance,
    concordance_with_ci,
    weighted_classification,
)
from gpfm_core.evaluation.survival import (
    assign_bins,
    nll_survival_loss,
    risk_from_logits,
    survival_bins,
)


def _sklearn(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = p.argmax(axis=1)
    k = p.shape[1]
    if k == 2:
        auc = roc_auc_score(y, p[:, 1])
    elif len(np.unique(y)) == k:
        auc = roc_auc_score(y, p, multi_class="ovr", average="macro")
    else:  # scikit-learn's ovr needs every class: average the binary AUROCs of present ones
        auc = np.mean([roc_auc_score(y == c, p[:, c]) for c in np.unique(y)])
    with warnings.catch_warnings():  # a predicted class absent from y: expected here
        warnings.simplefilter("ignore", UserWarning)
        bal = balanced_accuracy_score(y, pred)
    return {
        "balanced_accuracy": bal,
        "f1_macro": f1_score(y, pred, average="macro", zero_division=0),
        "auroc_macro": auc,
    }


def _case(n: int, k: int, *, ties: bool, seed: int, drop_class: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k - 1 if drop_class else k, n)
    p = rng.random((n, k))
    p[np.arange(n), y] += 0.6
    if ties:
        p = np.round(p, 1)
    return y, p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("n", "k", "ties", "drop_class"),
    [
        (200, 2, False, False),
        (200, 2, True, False),
        (300, 4, False, False),
        (300, 4, True, False),
        (150, 5, True, True),
    ],
)
def test_unit_weights_reproduce_scikit_learn(n: int, k: int, ties: bool, drop_class: bool) -> None:
    y, p = _case(n, k, ties=ties, seed=k + n, drop_class=drop_class)
    want = _sklearn(y, p)
    got = weighted_classification(y, p, np.ones((1, n)))
    point = classification_metrics(y, p)
    for m, v in want.items():
        assert got[m][0] == pytest.approx(v, abs=1e-12), m
        assert point[m] == pytest.approx(v, abs=1e-12), m


def test_count_weights_equal_explicit_resamples() -> None:
    y, p = _case(40, 3, ties=True, seed=3)
    counts = bootstrap_counts(40, n_resamples=25, seed=7)
    got = weighted_classification(y, p, counts)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 40, size=(25, 40))  # the draws behind bootstrap_counts(seed=7)
    for b in range(25):
        assert np.array_equal(np.bincount(draws[b], minlength=40), counts[b])
        idx = draws[b]
        want = _sklearn(y[idx], p[idx])
        for m, v in want.items():
            assert got[m][b] == pytest.approx(v, abs=1e-12), (b, m)


def test_intervals_contain_the_estimate_and_follow_the_seed() -> None:
    y, p = _case(120, 3, ties=False, seed=11)
    a = classification_with_ci(y, p, n_resamples=300, seed=5)
    b = classification_with_ci(y, p, n_resamples=300, seed=5)
    c = classification_with_ci(y, p, n_resamples=300, seed=6)
    assert a == b
    assert a != c
    for est in a.values():
        assert est.ci_low <= est.value <= est.ci_high
        assert est.ci_high - est.ci_low > 0.01  # 120 items: a real interval, not a point


def test_classification_rejects_bad_input() -> None:
    with pytest.raises(GpfmError, match="class indices"):
        classification_metrics(np.array([0, 3]), np.ones((2, 2)))
    with pytest.raises(GpfmError, match="one row per item"):
        classification_metrics(np.array([0, 1, 1]), np.ones((2, 2)))


def _harrell(t: np.ndarray, e: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index by its definition: comparable pairs, ties in risk count 1/2.

    A pair is comparable when the earlier time is an event; at equal times an event and a
    censored case are comparable too (the censored case outlived it), as lifelines does.
    """
    num = den = 0.0
    for i in range(t.size):
        for j in range(t.size):
            if e[i] and (t[i] < t[j] or (t[i] == t[j] and not e[j])):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concordance_is_harrells_c_index(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = rng.uniform(1, 100, 30).round()  # some tied times
    e = rng.random(30) < 0.7
    risk = -t + rng.normal(0, 30, 30)
    assert concordance(t, e, risk) == pytest.approx(_harrell(t, e, risk), abs=1e-12)
    assert concordance(t, e, risk) == pytest.approx(concordance_index(t, -risk, e))


def test_concordance_extremes_and_interval() -> None:
    t = np.arange(1.0, 21.0)
    e = np.ones(20, bool)
    assert concordance(t, e, -t) == 1.0  # earliest events have the highest risk
    assert concordance(t, e, t) == 0.0
    est = concordance_with_ci(t, e, -t + np.random.default_rng(0).normal(0, 4, 20), n_resamples=200)
    assert est.ci_low <= est.value <= est.ci_high
    with pytest.raises(GpfmError, match="observed event"):
        concordance(t, np.zeros(20, bool), t)


def test_survival_bins_follow_porpoise() -> None:
    """Quantiles of the uncensored times (pd.qcut), widened, then pd.cut(right=False)."""
    rng = np.random.default_rng(4)
    t = rng.exponential(30, 80).round(1)
    c = (rng.random(80) < 0.3).astype(int)
    edges = survival_bins(t, c, n_bins=4)
    _, q = pd.qcut(t[c == 0], q=4, retbins=True, labels=False)
    q[0], q[-1] = t.min() - 1e-6, t.max() + 1e-6
    assert np.allclose(edges, q)
    want = pd.cut(t, bins=q, labels=False, right=False, include_lowest=True)
    assert np.array_equal(assign_bins(t, edges), np.asarray(want))
    with pytest.raises(GpfmError, match="uncensored"):
        survival_bins(t[:3], np.zeros(3, int), n_bins=4)


@pytest.mark.parametrize(("bin_", "censored"), [(0, 0), (2, 0), (3, 0), (0, 1), (2, 1), (3, 1)])
def test_nll_is_the_discrete_time_likelihood(bin_: int, censored: int) -> None:
    logits = torch.tensor([[0.3, -1.2, 0.8, 0.1]])
    h = torch.sigmoid(logits)[0].double()
    surv_before = torch.prod(1 - h[:bin_])
    if censored:  # alive at the end of its bin
        want = -torch.log(surv_before * (1 - h[bin_]))
    else:  # survived the earlier bins, event in this one
        want = -torch.log(surv_before * h[bin_])
    got = nll_survival_loss(logits, torch.tensor([bin_]), torch.tensor([censored]))
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_risk_grows_with_the_hazards() -> None:
    logits = np.array([[-3.0, -3, -3, -3], [0, 0, 0, 0], [3, 3, 3, 3]])
    hazards, surv, risk = risk_from_logits(logits)
    assert np.all(np.diff(risk) > 0)
    assert np.allclose(surv, np.cumprod(1 - hazards, axis=1))
