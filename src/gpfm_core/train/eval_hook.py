"""Evaluation during training: kNN and linear-probe accuracy on a held-out labelled tile set.

Every ``eval.every`` steps the EMA teacher's CLS features (the student's when the run does
not self-distil) of a small labelled tile set are scored by a cosine kNN classifier and a
logistic-regression probe, both balanced accuracy under stratified k-fold cross-validation
(:func:`gpfm_core.train.probe.knn_accuracy`, :func:`~gpfm_core.train.probe.linear_probe_accuracy`),
and logged to ``<run>/eval.csv`` and TensorBoard (``eval/knn_acc``, ``eval/linear_acc``).

Tasks (``eval.task``), built once per run:

- ``stain_variation``: the built-in task of the sample images (``GPFM_DATA_DIR``): skin vs
  carcinoma tiles under random stain perturbation (:func:`~gpfm_core.train.probe.stain_variation_task`);
- ``holdout``: the tiles ``data.holdout_every`` keeps out of training, labelled by their source
  slide (at most ``eval.n_per_class`` per slide, at least two slides).

The hook only reads the model (no gradient, no RNG draw), so a run with evaluation takes the
same steps as one without, and resumes exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import ConfigError

__all__ = ["EVAL_COLUMNS", "EvalSet", "build_eval_set", "embed_tiles", "evaluate", "score"]

log = logging.getLogger(__name__)

EVAL_COLUMNS = ["step", "knn_acc", "linear_acc", "n_tiles", "n_classes"]
TASKS = ("stain_variation", "holdout")


@dataclass(frozen=True)
class EvalSet:
    """Labelled tiles: ``tiles`` (N, H, W, 3) uint8, ``labels`` (N,) int64, ``task`` name."""

    tiles: np.ndarray
    labels: np.ndarray
    task: str


def check_eval_config(cfg: dict[str, Any]) -> None:
    """Value checks of the ``eval`` section (one-line :class:`ConfigError`)."""
    e = cfg["eval"]
    for key, low in (("every", 0), ("n_per_class", 2), ("knn_k", 1), ("folds", 2)):
        if not isinstance(e[key], int) or e[key] < low:
            raise ConfigError(f"eval.{key} must be an int >= {low}, got {e[key]!r}")
    if e["task"] not in TASKS:
        raise ConfigError(f"eval.task must be {' or '.join(TASKS)}, got {e['task']!r}")
    if e["every"] and e["task"] == "holdout" and int(cfg["data"]["holdout_every"] or 0) < 2:
        raise ConfigError("eval.task holdout needs data.holdout_every >= 2 (e.g. 10)")


def build_eval_set(cfg: dict[str, Any], *, index: str | os.PathLike[str] | None = None) -> EvalSet:
    """The labelled tiles of ``eval.task`` at the run's ``data.tile_px`` / ``data.mpp``.

    Raises
    ------
    ConfigError
        ``stain_variation`` without ``GPFM_DATA_DIR``; ``holdout`` with fewer than two
        sources among the held-out tiles.
    """
    e, d = cfg["eval"], cfg["data"]
    n = int(e["n_per_class"])
    if e["task"] == "stain_variation":
        from gpfm_core.train.data import sample_data_paths
        from gpfm_core.train.probe import stain_variation_task

        folder = sample_data_paths()[0].parent
        tiles, labels = stain_variation_task(
            folder,
            tile_px=int(d["tile_px"]),
            mpp=float(d["mpp"]),
            n_per_class=n,
            seed=int(cfg["seed"]),
        )
        return EvalSet(tiles, labels, "stain_variation")
    from gpfm_core.train.data import TileReadError, build_dataset

    held = build_dataset({**d, "cache_in_memory": False}, split="holdout", index=index)
    labels = held.labels
    rng = np.random.default_rng([int(cfg["seed"]), 4099])
    picked: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        picked.extend(rng.permutation(members)[:n].tolist())
    tiles, kept = [], []
    for i in sorted(picked):
        try:
            tiles.append(held[i])
            kept.append(int(labels[i]))
        except TileReadError as exc:
            log.warning("evaluation tile skipped: %s", exc)
    held.close()
    y = np.asarray(kept, np.int64)
    if len(np.unique(y)) < 2:
        raise ConfigError(
            "eval.task holdout needs held-out tiles of at least two slides: add slides or lower "
            "data.holdout_every"
        )
    return EvalSet(
        np.stack(tiles), np.unique(y, return_inverse=True)[1].astype(np.int64), "holdout"
    )


def embed_tiles(
    model: Any,
    tiles: np.ndarray,
    *,
    size: int,
    batch_size: int = 64,
    amp_dtype: Any = None,
) -> np.ndarray:
    """CLS features of ``tiles`` (N, H, W, 3) uint8 from the teacher (or student) backbone.

    Tiles are resized to ``size`` (the global crop size) and normalised with the student's
    mean/std, as the training crops are. Returns (N, D) float32. Under FSDP every rank must
    call this (the forward gathers shards).
    """
    import torch
    import torch.nn.functional as F

    from gpfm_core.train.models import normalise

    backbone = model.teacher["backbone"] if model.self_distill else model.backbone
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(tiles), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(tiles[i : i + batch_size]))
                x = x.to(device).permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(
                    x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    cls = backbone(normalise(x, model.mean, model.std))["cls"]
                out.append(cls.float().cpu().numpy())
    finally:
        backbone.train(was_training)
    return np.concatenate(out).astype(np.float32)


def score(
    features: np.ndarray, labels: np.ndarray, *, k: int, folds: int, seed: int
) -> dict[str, float]:
    """``knn_acc`` and ``linear_acc`` (balanced accuracy, stratified CV) of ``features``."""
    from gpfm_core.train.probe import knn_accuracy, linear_probe_accuracy

    folds = max(2, min(int(folds), int(np.bincount(labels).min())))
    return {
        "knn_acc": knn_accuracy(features, labels, k=k, folds=folds, seed=seed),
        "linear_acc": linear_probe_accuracy(features, labels, folds=folds, seed=seed),
    }


def evaluate(
    model: Any, eval_set: EvalSet, cfg: dict[str, Any], *, amp_dtype: Any = None, main: bool = True
) -> dict[str, float] | None:
    """Embed ``eval_set`` and score it (on the main rank; others return None)."""
    e = cfg["eval"]
    feats = embed_tiles(
        model,
        eval_set.tiles,
        size=int(cfg["crops"]["global_crops_size"]),
        batch_size=int(e["batch_size"]),
        amp_dtype=amp_dtype,
    )
    if not main:
        return None
    res = score(
        feats, eval_set.labels, k=int(e["knn_k"]), folds=int(e["folds"]), seed=int(cfg["seed"])
    )
    return {
        **res,
        "n_tiles": len(eval_set.labels),
        "n_classes": len(np.unique(eval_set.labels)),
    }


def eval_log_path(out_dir: str | os.PathLike[str]) -> Path:
    """``<run>/eval.csv``."""
    return Path(out_dir) / "eval.csv"
