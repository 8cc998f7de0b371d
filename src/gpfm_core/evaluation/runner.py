"""``run_evaluation``: every task of a spec x every encoder -> one report folder.

A task that fails for one encoder (missing features, a class without training items ...)
is recorded in the report's ``run.json`` under ``errors`` and the others go on; the caller
(``gpfm eval``) exits non-zero when there was any.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import ConfigError, GpfmError
from gpfm_core.evaluation.features import (
    EncoderInfo,
    embed_images,
    find_slide_features,
    slide_encoder_info,
    slide_tile_features,
)
from gpfm_core.evaluation.metrics import (
    CLASSIFICATION_METRICS,
    Estimate,
    classification_metrics,
    classification_with_ci,
    concordance,
    concordance_with_ci,
    summarise,
)
from gpfm_core.evaluation.report import CurveData, package_versions, write_report, write_table
from gpfm_core.evaluation.spec import (
    EvalSpec,
    TaskSpec,
    class_index,
    encoder_folder_name,
    load_spec,
    read_items,
    slide_folds,
    tile_splits,
)

__all__ = ["EvalReport", "TaskOutcome", "run_evaluation", "run_slide_task", "run_tile_task"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class TaskOutcome:
    """One task x encoder: its result rows and what the plots and tests need.

    Attributes
    ----------
    rows
        Result rows (see :data:`gpfm_core.evaluation.report.RESULT_COLUMNS`).
    curves
        Data for ROC / Kaplan-Meier plots.
    encoder
        :class:`EncoderInfo` of the features used.
    slides
        Slide tasks: slide id -> ``{"fold", "output": SlideOutput}`` for every test slide.
    models
        Slide tasks: the saved model file of each fold.
    """

    task: str
    kind: str
    encoder_name: str
    rows: list[dict[str, Any]]
    curves: CurveData
    encoder: EncoderInfo
    slides: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: list[Path] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvalReport:
    """Everything :func:`run_evaluation` produced."""

    out: Path
    rows: list[dict[str, Any]]
    outcomes: list[TaskOutcome]
    errors: list[dict[str, str]]
    written: dict[str, Path]


def _row(
    task: TaskSpec,
    info: EncoderInfo,
    encoder: str,
    protocol: str,
    metric: str,
    est: Estimate,
    n_test: int,
    n_folds: int,
) -> dict[str, Any]:
    return {
        "task": task.name,
        "type": task.kind,
        "encoder": encoder,
        "weights_hash": info.weights_hash,
        "protocol": protocol,
        "metric": metric,
        "value": est.value,
        "ci_low": est.ci_low,
        "ci_high": est.ci_high,
        "sd": est.sd,
        "n_test": n_test,
        "n_folds": n_folds,
    }


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# ----------------------------------------------------------------------------- tile tasks
def run_tile_task(
    task: TaskSpec,
    encoder: str,
    *,
    out: Path,
    seed: int,
    bootstrap: int,
    device: str = "auto",
) -> TaskOutcome:
    """Embed (or look up) the task's tiles with one encoder and run its protocols."""
    from gpfm_core.evaluation.tile import LinearProbeConfig, run_tile_protocols

    t0 = time.perf_counter()
    rows = read_items(task)
    names, y = class_index(task, rows)
    split = tile_splits(task, rows, y, seed=seed)
    if "path" in rows[0]:
        cache = out / "features" / _safe(task.name) / f"{_safe(encoder_folder_name(encoder))}.h5"
        x, info = embed_images([r["path"] for r in rows], encoder, cache=cache, device=device)
    else:
        files = find_slide_features(
            task.features_dir(encoder),
            sorted({r["slide_id"] for r in rows}),
            encoder=encoder_folder_name(encoder),
        )
        info = slide_encoder_info(files, encoder)
        x = slide_tile_features(rows, files)
    splits = {s: (x[split == s], y[split == s]) for s in ("train", "val", "test")}
    try:
        linear = LinearProbeConfig(**task.linear)
    except TypeError as exc:
        raise ConfigError(f"task {task.name!r}: bad linear option ({exc})") from None
    results = run_tile_protocols(
        splits,
        n_classes=len(names),
        protocols=task.protocols,
        linear=linear,
        knn_k=tuple(task.knn.get("k", (1, 20))),
        knn_temperature=float(task.knn.get("temperature", 0.07)),
        shots=tuple(task.fewshot.get("shots", (1, 2, 4, 8, 16))),
        repeats=int(task.fewshot.get("repeats", 5)),
        n_resamples=bootstrap,
        seed=seed,
    )
    n_test = int((split == "test").sum())
    out_rows = [
        _row(task, info, encoder, r.protocol, m, est, n_test, 1)
        for r in results
        for m, est in r.metrics.items()
    ]
    curve = CurveData(class_names=names)
    scored = [r for r in results if r.scores is not None]
    if scored:
        first = next((r for r in scored if r.protocol == "linear"), scored[0])
        curve.y_true, curve.scores = splits["test"][1], first.scores
        test_rows = [r for r, s in zip(rows, split, strict=True) if s == "test"]
        pred_rows = [
            {
                "item": r.get("path") or f"{r['slide_id']}@{r['x']},{r['y']}",
                "label": r[task.label_col],
                "predicted": names[int(np.argmax(p))],
                **{f"p_{n}": float(v) for n, v in zip(names, p, strict=True)},
            }
            for r, p in zip(test_rows, first.scores, strict=True)
        ]
        write_table(
            out
            / "predictions"
            / f"{_safe(task.name)}__{_safe(encoder_folder_name(encoder))}__{first.protocol}.csv",
            pred_rows,
            ["item", "label", "predicted", *[f"p_{n}" for n in names]],
        )
    return TaskOutcome(
        task.name, task.kind, encoder, out_rows, curve, info, seconds=time.perf_counter() - t0
    )


# ---------------------------------------------------------------------------- slide tasks
def _survival_targets(
    task: TaskSpec, rows: Sequence[Mapping[str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    try:
        t = np.array([float(r["survival_months"]) for r in rows])
        c = np.array([int(float(r["censorship"])) for r in rows])
    except ValueError:
        raise ConfigError(
            f"task {task.name!r}: survival_months must be numbers and censorship 0 or 1"
        ) from None
    if not np.isfinite(t).all() or (t < 0).any() or not np.isin(c, (0, 1)).all():
        raise ConfigError(
            f"task {task.name!r}: survival_months must be >= 0 and censorship 0 (event) or 1 (censored)"
        )
    return t, c


def run_slide_task(
    task: TaskSpec,
    encoder: str,
    *,
    out: Path | None,
    seed: int,
    bootstrap: int,
    labels_override: np.ndarray | None = None,
    progress: Progress | None = None,
) -> TaskOutcome:
    """ABMIL on every fold of a slide classification or survival task, for one encoder.

    Parameters
    ----------
    task
        A ``slide`` or ``survival`` task.
    encoder
        Names the features folder (``{encoder}`` of the task's ``features``).
    out
        Report folder: models go to ``models/<task>/<encoder>/fold<k>.safetensors`` and
        per-slide predictions to ``predictions/``; None writes nothing.
    seed
        Fold assignment and training (fold k trains with ``seed + k``).
    bootstrap
        Resamples of the intervals when the task has a single split.
    labels_override
        Replaces the targets in CSV order (classification: class indices; survival: a
        permutation of the rows' (time, censorship) pairs) — for null-signal checks. With
        ``bag: case`` a case takes the value of its first slide's row.
    """
    from gpfm_core.evaluation.mil import MILConfig, train_abmil

    t0 = time.perf_counter()
    rows, keep, bags, info = _load_slide_cohort(task, encoder)
    cfg = MILConfig.from_dict(task.abmil)
    ids = [r["slide_id"] for r in rows]
    tiling = dict(info.tiling)
    names: list[str] = []
    if task.kind == "slide":
        names, y = class_index(task, rows)
        if labels_override is not None:
            y = np.asarray(labels_override, dtype=np.int64)[keep]
        strata = y
        t = c = None
    else:
        t, c = _survival_targets(task, rows)
        if labels_override is not None:
            perm = np.asarray(labels_override, dtype=np.int64)
            t_all, c_all = _survival_targets(task, read_items(task))
            t, c = t_all[perm][keep], c_all[perm][keep]
        strata = c
        y = None
    folds = slide_folds(task, rows, strata, seed=seed)
    per_fold: dict[str, list[float]] = {}
    slides: dict[str, dict[str, Any]] = {}
    models: list[Path] = []
    for fold in folds:
        if progress is not None:
            progress(f"{task.name} / {encoder}: fold {fold.index + 1} of {len(folds)}")
        res = train_abmil(
            bags,
            task="classification" if task.kind == "slide" else "survival",
            train=fold.train,
            val=fold.val,
            evaluate=fold.test,
            labels=y,
            class_names=names,
            time=t,
            censorship=c,
            config=cfg,
            seed=seed + fold.index,
            encoder=info.name,
            weights_hash=info.weights_hash,
            tiling=tiling,
        )
        res.model.training.update({"task": task.name, "fold": fold.index})
        if out is not None:
            path = (
                out
                / "models"
                / _safe(task.name)
                / _safe(encoder_folder_name(encoder))
                / f"fold{fold.index}.safetensors"
            )
            models.append(res.model.save(path))
        test = fold.test
        for i in test:
            slides[ids[int(i)]] = {
                "fold": fold.index,
                "index": int(i),
                "output": res.outputs[int(i)],
            }
        if task.kind == "slide":
            assert y is not None
            probs = np.stack([res.outputs[int(i)].probabilities for i in test])
            if len(np.unique(y[test])) < 2:
                log.warning(
                    "%s fold %d: the test fold holds one class; AUROC undefined",
                    task.name,
                    fold.index,
                )
            for m, v in classification_metrics(y[test], probs).items():
                per_fold.setdefault(m, []).append(v)
        else:
            assert t is not None and c is not None
            risk = np.array([res.outputs[int(i)].risk for i in test])
            ev = c[test] == 0
            per_fold.setdefault("c_index", []).append(
                concordance(t[test], ev, risk) if ev.any() else float("nan")
            )
    test_idx = np.array([s["index"] for s in slides.values()])
    n_test = int(test_idx.size)
    single = len(folds) == 1
    rows_out = []
    curve = CurveData(class_names=names)
    pred_rows = []
    if task.kind == "slide":
        assert y is not None
        probs = np.stack([s["output"].probabilities for s in slides.values()])
        if single:
            ests = classification_with_ci(y[test_idx], probs, n_resamples=bootstrap, seed=seed)
        else:
            ests = {}
            for m in CLASSIFICATION_METRICS:
                mean, sd = summarise(per_fold[m])
                ests[m] = Estimate(mean, sd=sd)
        for m, est in ests.items():
            rows_out.append(_row(task, info, encoder, "abmil", m, est, n_test, len(folds)))
        curve.y_true, curve.scores = y[test_idx], probs
        for sid, s in slides.items():
            pred_rows.append(
                {
                    "slide_id": sid,
                    "fold": s["fold"],
                    "label": names[int(y[s["index"]])],
                    "predicted": s["output"].prediction,
                    **{
                        f"p_{n}": float(v)
                        for n, v in zip(names, s["output"].probabilities, strict=True)
                    },
                    "top_tile": int(np.argmax(s["output"].attention)),
                }
            )
        cols = ["slide_id", "fold", "label", "predicted", *[f"p_{n}" for n in names], "top_tile"]
    else:
        assert t is not None and c is not None
        risk = np.array([s["output"].risk for s in slides.values()])
        fold_of = np.array([s["fold"] for s in slides.values()])
        if single:
            est = concordance_with_ci(
                t[test_idx], c[test_idx] == 0, risk, n_resamples=bootstrap, seed=seed
            )
        else:
            mean, sd = summarise(per_fold["c_index"])
            est = Estimate(mean, sd=sd)
        rows_out.append(_row(task, info, encoder, "abmil", "c_index", est, n_test, len(folds)))
        high = np.zeros(risk.size, bool)
        for f in np.unique(fold_of):
            sel = fold_of == f
            high[sel] = risk[sel] > np.median(risk[sel])
        curve.time, curve.event, curve.high_risk = t[test_idx], c[test_idx] == 0, high
        for (sid, s), r, h in zip(slides.items(), risk, high, strict=True):
            pred_rows.append(
                {
                    "slide_id": sid,
                    "fold": s["fold"],
                    "survival_months": float(t[s["index"]]),
                    "censorship": int(c[s["index"]]),
                    "risk": float(r),
                    "risk_group": "high" if h else "low",
                    "top_tile": int(np.argmax(s["output"].attention)),
                }
            )
        cols = [
            "slide_id",
            "fold",
            "survival_months",
            "censorship",
            "risk",
            "risk_group",
            "top_tile",
        ]
    if out is not None:
        write_table(
            out / "predictions" / f"{_safe(task.name)}__{_safe(encoder_folder_name(encoder))}.csv",
            pred_rows,
            cols,
        )
    return TaskOutcome(
        task.name,
        task.kind,
        encoder,
        rows_out,
        curve,
        info,
        slides,
        models,
        time.perf_counter() - t0,
    )


# ------------------------------------------------------------------------------- driver
def run_evaluation(
    spec: EvalSpec | str | os.PathLike[str],
    encoders: Sequence[str],
    *,
    out: str | os.PathLike[str],
    device: str = "auto",
    seed: int | None = None,
    bootstrap: int | None = None,
    tasks: Sequence[str] | None = None,
    progress: Progress | None = None,
    command: Sequence[str] | None = None,
) -> EvalReport:
    """Run every task of a spec for every encoder and write the report folder.

    Parameters
    ----------
    spec
        An :class:`EvalSpec` or the path of a YAML spec.
    encoders
        Encoder names (or checkpoint paths); each names the ``{encoder}`` features folder
        of slide tasks and embeds the images of tile tasks.
    out
        Report folder.
    device
        Where tile images are embedded.
    seed, bootstrap
        Override the spec's.
    tasks
        Run only these task names.
    progress
        Called with one line per step.
    command
        The command line, recorded in ``run.json``.

    Returns
    -------
    EvalReport
    """
    s = spec if isinstance(spec, EvalSpec) else load_spec(spec)
    if not encoders:
        raise GpfmError("name at least one encoder (--encoders a,b)")
    seed_ = s.seed if seed is None else int(seed)
    boot = s.bootstrap if bootstrap is None else int(bootstrap)
    selected = [t for t in s.tasks if tasks is None or t.name in tasks]
    if tasks is not None and len(selected) != len(set(tasks)):
        known = [t.name for t in s.tasks]
        raise ConfigError(
            f"unknown task(s) {sorted(set(tasks) - set(known))}: the spec has {known}"
        )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    outcomes: list[TaskOutcome] = []
    errors: list[dict[str, str]] = []
    t0 = time.perf_counter()
    for task in selected:
        for enc in encoders:
            say = progress or (lambda msg: log.info("%s", msg))
            say(f"{task.name} / {enc}: {task.kind} task")
            try:
                if task.kind == "tile":
                    o = run_tile_task(
                        task, enc, out=root, seed=seed_, bootstrap=boot, device=device
                    )
                else:
                    o = run_slide_task(
                        task, enc, out=root, seed=seed_, bootstrap=boot, progress=progress
                    )
            except GpfmError as exc:
                errors.append({"task": task.name, "encoder": enc, "error": str(exc)})
                say(f"{task.name} / {enc}: FAILED: {exc}")
                continue
            outcomes.append(o)
            prot, metric = task.primary_metric
            val = next(
                (r["value"] for r in o.rows if r["protocol"] == prot and r["metric"] == metric),
                float("nan"),
            )
            say(f"{task.name} / {enc}: {prot} {metric} = {val:.3f} ({o.seconds:.1f} s)")
    rows = [r for o in outcomes for r in o.rows]
    curves: dict[str, dict[str, CurveData]] = {}
    for o in outcomes:
        curves.setdefault(o.task, {})[o.encoder_name] = o.curves
    run = {
        "spec": {"name": s.name, "path": str(s.path) if s.path else None, "root": str(s.root)},
        "tasks": [
            {
                "name": t.name,
                "type": t.kind,
                "items": str(t.items or t.folders),
                "primary": list(t.primary_metric),
            }
            for t in selected
        ],
        "encoders": [
            {"task": o.task, "encoder": o.encoder_name, **o.encoder.as_dict(), "seconds": o.seconds}
            for o in outcomes
        ],
        "seeds": {
            "seed": seed_,
            "bootstrap_resamples": boot,
            "fold_training_seeds": "seed + fold index",
            "few_shot_draws": "numpy default_rng([seed, shots, repeat])",
        },
        "versions": package_versions(),
        "command": list(command) if command is not None else list(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - t0,
        "errors": errors,
    }
    written = write_report(
        root,
        rows,
        primary={t.name: t.primary_metric for t in selected},
        curves=curves,
        kinds={t.name: t.kind for t in selected},
        run=run,
    )
    return EvalReport(root, rows, outcomes, errors, written)


@dataclass
class TrainedSlideModel:
    """What :func:`train_slide_model` produced: the model, its file, its split metrics."""

    model: Any
    path: Path | None
    metrics: dict[str, dict[str, float]]


def _load_slide_cohort(
    task: TaskSpec, encoder: str
) -> tuple[list[dict[str, str]], list[int], Any, EncoderInfo]:
    """Rows with a features file, their index into the CSV, their bags and the encoder."""
    from gpfm_core.evaluation.mil import SlideBags

    rows_all = read_items(task)
    files = find_slide_features(
        task.features_dir(encoder),
        [r["slide_id"] for r in rows_all],
        encoder=encoder_folder_name(encoder) if encoder else None,
        missing=task.missing,
    )
    keep = [i for i, r in enumerate(rows_all) if r["slide_id"] in files]
    rows = [rows_all[i] for i in keep]
    if not rows:
        raise GpfmError(f"task {task.name!r}: no slide has a features file")
    paths = {r["slide_id"]: files[r["slide_id"]] for r in rows}
    info = slide_encoder_info(paths, encoder)
    if task.bag == "slide":
        return rows, keep, SlideBags([paths[r["slide_id"]] for r in rows]), info
    return (*_case_bags(task, rows, keep, paths), info)


def _case_bags(
    task: TaskSpec, rows: list[dict[str, str]], keep: list[int], paths: Mapping[str, Path]
) -> tuple[list[dict[str, str]], list[int], Any]:
    """One bag per ``case_id``: the tiles of all its slides (patient-level, as PORPOISE).

    Returns case rows (the first slide's row, ``slide_id`` set to the case id), the CSV index
    of that first row, and the bags. The slides of a case must agree on the targets.
    """
    from gpfm_core.evaluation.mil import SlideBags

    if "case_id" not in rows[0]:
        raise ConfigError(f"task {task.name!r}: bag: case needs a case_id column")
    targets = (task.label_col,) if task.kind == "slide" else ("survival_months", "censorship")
    cases: dict[str, list[int]] = {}
    for j, r in enumerate(rows):
        cases.setdefault(r["case_id"], []).append(j)
    out_rows, out_keep, bags = [], [], []
    for case, members in cases.items():
        first = rows[members[0]]
        for j in members[1:]:
            if any(rows[j][k] != first[k] for k in targets):
                raise ConfigError(
                    f"task {task.name!r}: the slides of case {case} disagree on {'/'.join(targets)}"
                )
        out_rows.append({**first, "slide_id": case})
        out_keep.append(keep[members[0]])
        bags.append([paths[rows[j]["slide_id"]] for j in members])
    return out_rows, out_keep, SlideBags(bags)


def train_slide_model(
    items: str | os.PathLike[str],
    *,
    features: str | os.PathLike[str],
    task: str = "classification",
    label_col: str = "label",
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    config: Any = None,
    seed: int = 0,
    missing: str = "error",
    out: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainedSlideModel:
    """Train one ABMIL slide model from a CSV of slides and a folder of feature files.

    Parameters
    ----------
    items
        CSV: ``slide_id,label`` or ``slide_id,survival_months,censorship``; an optional
        ``split`` column (train / val / test) decides the splits, else ``val_fraction`` of
        the slides (stratified by class or censorship) validates.
    features
        Folder of ``<slide_id>.h5`` files (searched recursively).
    task
        ``"classification"`` or ``"survival"``.
    label_col, classes
        The class column and the class order (default: sorted labels).
    val_fraction
        Share of validation slides without a split column.
    config
        :class:`~gpfm_core.evaluation.mil.MILConfig` (default: the paper's).
    seed
        Split and training seed.
    missing
        ``"error"`` or ``"skip"`` slides without a features file.
    out
        Where to save the model (``.safetensors``); None keeps it in memory only.
    progress
        ``progress(epoch, max_epochs, val_loss)``.

    Returns
    -------
    TrainedSlideModel
        Metrics per evaluated split (``val``, and ``test`` when the CSV has one):
        classification ``balanced_accuracy``, ``f1_macro``, ``auroc_macro``; survival ``c_index``.
    """
    from gpfm_core.evaluation.mil import train_abmil
    from gpfm_core.evaluation.spec import _stratified_pick

    if task not in ("classification", "survival"):
        raise GpfmError(f"task must be 'classification' or 'survival', not {task!r}")
    spec = TaskSpec(
        name=Path(items).stem,
        kind="slide" if task == "classification" else "survival",
        items=Path(items),
        features=str(features),
        label_col=label_col,
        classes=list(classes) if classes else None,
        missing=missing,
    )
    rows, _, bags, info = _load_slide_cohort(spec, "")
    names: list[str] = []
    y = t = c = None
    if task == "classification":
        names, y = class_index(spec, rows)
        strata = y
    else:
        t, c = _survival_targets(spec, rows)
        strata = c
    if "split" in rows[0]:
        split = np.array([r["split"] for r in rows])
    else:
        if not 0.0 < val_fraction < 1.0:
            raise GpfmError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        split = np.full(len(rows), "train", dtype=object)
        split[_stratified_pick(strata, val_fraction, np.random.default_rng(seed))] = "val"
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    res = train_abmil(
        bags,
        task=task,
        train=tr,
        val=va,
        evaluate=np.concatenate([va, te]),
        labels=y,
        class_names=names,
        time=t,
        censorship=c,
        config=config,
        seed=seed,
        encoder=info.name,
        weights_hash=info.weights_hash,
        tiling=dict(info.tiling),
        progress=progress,
    )
    metrics: dict[str, dict[str, float]] = {}
    for name, idx in (("val", va), ("test", te)):
        if idx.size == 0:
            continue
        if task == "classification":
            assert y is not None
            probs = np.stack([res.outputs[int(i)].probabilities for i in idx])
            metrics[name] = classification_metrics(y[idx], probs)
        else:
            assert t is not None and c is not None
            risk = np.array([res.outputs[int(i)].risk for i in idx])
            ev = c[idx] == 0
            metrics[name] = {"c_index": concordance(t[idx], ev, risk) if ev.any() else math.nan}
    res.model.training.update({"items": str(items), "metrics": metrics})
    path = res.model.save(out) if out is not None else None
    return TrainedSlideModel(res.model, path, metrics)
