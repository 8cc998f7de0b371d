"""The report folder: result tables, the average-rank table, plots and provenance.

Layout written by :func:`write_report`::

    <out>/results.csv, results.json   one row per task x encoder x protocol x metric
    <out>/ranks.csv, ranks.json       rank of each encoder on each task + average rank
    <out>/run.json                    encoders (weights hash, tiling), seeds, versions, errors
    <out>/plots/roc_<task>.png        ROC curves, one per encoder
    <out>/plots/km_<task>.png         Kaplan-Meier curves split at the predicted-risk median
    <out>/plots/ranks.png             average rank per encoder (bar chart)

Ranking follows the GPFM paper: on each task the encoders are ranked by the task's primary
metric (1 = best; ties share the mean rank), and the ranks are averaged over tasks.
Plots use matplotlib's object API on an Agg canvas (no pyplot, no display, no global
backend switch), so they render the same in a terminal, in CI and beside napari.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core._atomic import atomic_path, write_atomic

__all__ = [
    "RESULT_COLUMNS",
    "CurveData",
    "average_ranks",
    "package_versions",
    "plot_km",
    "plot_ranks",
    "plot_roc",
    "write_report",
    "write_table",
]

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "task",
    "type",
    "encoder",
    "weights_hash",
    "protocol",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "sd",
    "n_test",
    "n_folds",
)


@dataclass
class CurveData:
    """What the plots need of one task x encoder.

    Attributes
    ----------
    y_true, scores
        ROC: (N,) class indices and (N, K) scores (tile: the linear probe's test split;
        slide: the out-of-fold predictions).
    time, event, high_risk
        Kaplan-Meier: (N,) follow-up, event observed, and whether the slide's predicted
        risk lies above its fold's median.
    """

    y_true: np.ndarray | None = None
    scores: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    high_risk: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)


def package_versions() -> dict[str, str]:
    """Versions of Python, the platform and every package a result depends on."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in (
        "napari-gpfm", "numpy", "scipy", "scikit-learn", "torch", "timm", "h5py",
        "safetensors", "lifelines", "matplotlib",
    ):  # fmt: skip
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _fmt(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return v


def _json_safe(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return _json_safe(v.tolist())
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON (NaN -> null) atomically."""
    return write_atomic(path, json.dumps(_json_safe(data), indent=2) + "\n", parents=True)


def write_table(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> Path:
    """Write rows as CSV (floats to 6 significant digits, NaN empty) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k, "")) for k in columns})
    return write_atomic(path, buf.getvalue(), parents=True)


def average_ranks(
    rows: Sequence[Mapping[str, Any]], primary: Mapping[str, tuple[str, str]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rank encoders per task by its primary (protocol, metric); average over tasks.

    Parameters
    ----------
    rows
        Result rows (``task``, ``encoder``, ``protocol``, ``metric``, ``value``).
    primary
        Task -> (protocol, metric); higher values rank first.

    Returns
    -------
    tuple
        One row per encoder (``encoder``, ``rank_<task>`` ..., ``average_rank``,
        ``wins``), best average first; and the task names ranked.
    """
    from scipy.stats import rankdata

    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    table = {e: {"encoder": e} for e in encoders}
    tasks = []
    for task, (prot, metric) in primary.items():
        vals = {
            r["encoder"]: float(r["value"])
            for r in rows
            if r["task"] == task and r["protocol"] == prot and r["metric"] == metric
        }
        vals = {e: v for e, v in vals.items() if math.isfinite(v)}
        if not vals:
            continue
        tasks.append(task)
        names = list(vals)
        ranks = rankdata([-vals[e] for e in names], method="average")
        for e, rk in zip(names, ranks, strict=True):
            table[e][f"rank_{task}"] = float(rk)
    out = []
    for e in encoders:
        rk = [table[e][f"rank_{t}"] for t in tasks if f"rank_{t}" in table[e]]
        table[e]["average_rank"] = float(np.mean(rk)) if rk else float("nan")
        table[e]["wins"] = int(sum(r == 1.0 for r in rk))
        table[e]["tasks_ranked"] = len(rk)
        out.append(table[e])
    out.sort(key=lambda r: math.inf if math.isnan(r["average_rank"]) else r["average_rank"])
    return out, tasks


# -------------------------------------------------------------------------------- plots
def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, parents=True) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _roc_xy(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Macro-average one-vs-rest ROC (binary: the positive class), and its AUROC."""
    from sklearn.metrics import auc, roc_curve

    k = scores.shape[1]
    classes = [1] if k == 2 else [c for c in range(k) if 0 < (y == c).sum() < y.size]
    grid = np.linspace(0, 1, 201)
    tprs = []
    for c in classes:
        fpr, tpr, _ = roc_curve(y == c, scores[:, c])
        tprs.append(np.interp(grid, fpr, tpr))
    mean = np.mean(tprs, axis=0)
    mean[0] = 0.0
    return grid, mean, float(auc(grid, mean))


def plot_roc(path: Path, task: str, curves: Mapping[str, CurveData]) -> Path | None:
    """ROC curves of every encoder on one task (macro-average for several classes)."""
    items = {e: c for e, c in curves.items() if c.y_true is not None and c.scores is not None}
    if not items:
        return None
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    for enc, c in items.items():
        assert c.y_true is not None and c.scores is not None
        if len(np.unique(c.y_true)) < 2:
            continue
        x, y, a = _roc_xy(c.y_true, c.scores)
        ax.plot(x, y, lw=1.6, label=f"{enc} (AUC {a:.3f})")
    k = next(iter(items.values())).scores.shape[1]  # type: ignore[union-attr]
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"{task}" + (" (macro-average)" if k > 2 else ""),
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_ranks(path: Path, ranks: Sequence[Mapping[str, Any]], n_tasks: int) -> Path | None:
    """Bar chart of the average rank of each encoder (lower is better)."""
    rows = [r for r in ranks if math.isfinite(r["average_rank"])]
    if not rows:
        return None
    fig = _figure(max(3.5, 1.0 + 0.9 * len(rows)), 3.4)
    ax = fig.add_subplot()
    names = [r["encoder"] for r in rows]
    vals = [r["average_rank"] for r in rows]
    bars = ax.bar(names, vals, color=["#1f77b4" if i else "#d62728" for i in range(len(rows))])
    for b, v, r in zip(bars, vals, rows, strict=True):
        ax.annotate(f"{v:.2f}\n{r['wins']} win(s)", (b.get_x() + b.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set(ylabel="average rank (1 = best)", title=f"average rank over {n_tasks} task(s)")
    ax.set_ylim(0, max(vals) * 1.35 + 0.1)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return _save(fig, path)


def plot_km(path: Path, task: str, curves: Mapping[str, CurveData]) -> Path | None:
    """Kaplan-Meier curves of the high- and low-risk halves, one panel per encoder.

    Slides are split at the median predicted risk of their fold (risks of different fold
    models are not on one scale); the title gives the log-rank p-value (lifelines).
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    items = {e: c for e, c in curves.items() if c.time is not None and c.high_risk is not None}
    if not items:
        return None
    fig = _figure(4.0 * len(items), 3.6)
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for ax, (enc, c) in zip(axes, items.items(), strict=True):
        assert c.time is not None and c.event is not None and c.high_risk is not None
        for grp, label, colour in ((False, "low risk", "#1f77b4"), (True, "high risk", "#d62728")):
            sel = c.high_risk == grp
            if sel.any():
                km = KaplanMeierFitter(label=f"{label} (n={int(sel.sum())})")
                km.fit(c.time[sel], c.event[sel])
                km.plot_survival_function(ax=ax, ci_show=True, color=colour)
        both = c.high_risk.any() and (~c.high_risk).any()
        p = (
            logrank_test(
                c.time[c.high_risk],
                c.time[~c.high_risk],
                c.event[c.high_risk],
                c.event[~c.high_risk],
            ).p_value
            if both
            else float("nan")
        )
        ax.set(
            title=f"{enc}\nlog-rank p = {p:.2g}",
            xlabel="survival_months",
            ylabel="survival probability",
        )
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    fig.suptitle(task)
    return _save(fig, path)


# ------------------------------------------------------------------------------- report
def write_report(
    out: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    primary: Mapping[str, tuple[str, str]],
    curves: Mapping[str, Mapping[str, CurveData]],
    kinds: Mapping[str, str],
    run: Mapping[str, Any],
) -> dict[str, Path]:
    """Write tables, ranks, plots and ``run.json`` into ``out``.

    Parameters
    ----------
    out
        Report folder (created).
    rows
        Result rows with :data:`RESULT_COLUMNS`.
    primary
        Task -> (protocol, metric) used for ranking.
    curves
        Task -> encoder -> :class:`CurveData`.
    kinds
        Task -> ``"tile"``, ``"slide"`` or ``"survival"``.
    run
        Provenance (encoders, seeds, versions, ...) for ``run.json``.

    Returns
    -------
    dict
        Name -> written path (``results_csv``, ``ranks_csv``, ``roc_<task>``, ...).
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["results_csv"] = write_table(root / "results.csv", rows, RESULT_COLUMNS)
    written["results_json"] = write_json(root / "results.json", list(rows))
    ranks, ranked = average_ranks(rows, primary)
    rank_cols = ["encoder", *[f"rank_{t}" for t in ranked], "average_rank", "wins", "tasks_ranked"]
    written["ranks_csv"] = write_table(root / "ranks.csv", ranks, rank_cols)
    written["ranks_json"] = write_json(
        root / "ranks.json",
        {"primary": {t: list(pm) for t, pm in primary.items() if t in ranked}, "ranks": ranks},
    )
    plots = root / "plots"
    for task, by_enc in curves.items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in task)
        if kinds.get(task) == "survival":
            p = plot_km(plots / f"km_{safe}.png", task, by_enc)
        else:
            p = plot_roc(plots / f"roc_{safe}.png", task, by_enc)
        if p is not None:
            written[p.stem] = p
    p = plot_ranks(plots / "ranks.png", ranks, len(ranked))
    if p is not None:
        written["ranks_png"] = p
    written["run_json"] = write_json(root / "run.json", dict(run))
    return written
