"""Tile predictions as CSV (one row per tile), for spreadsheets and QuPath-free pipelines."""

from __future__ import annotations

import csv
import io as _io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpfm_core._atomic import write_atomic
from gpfm_core.analysis._util import as_points, size_xy
from gpfm_core.errors import GpfmError


def predictions_to_csv(
    coords: np.ndarray,
    labels: np.ndarray,
    confidence: np.ndarray,
    class_names: Sequence[str],
    *,
    path: str | os.PathLike[str],
    tile_size_level0: int | tuple[int, int],
    probabilities: np.ndarray | None = None,
) -> Path:
    """One CSV row per tile: x, y, width, height, class, confidence[, p_<class>...].

    Parameters
    ----------
    coords
        (N, 2) int64 level-0 (x, y) top-left corners.
    labels
        (N,) int class index (negative -> class "").
    confidence
        (N,) float.
    class_names
        Name per class index.
    path
        CSV file (written atomically).
    tile_size_level0
        Side of each tile in level-0 pixels, or its ``(width, height)`` (non-square pixels:
        :attr:`gpfm_core.tiling.TileGrid.tile_size_level0_xy`).
    probabilities
        Optional (N, C) per-class probabilities -> columns ``p_<class>``.

    Returns
    -------
    pathlib.Path
    """
    xy = as_points(coords, name="coords")
    tw, th = size_xy(tile_size_level0, name="tile_size_level0")
    lab = np.asarray(labels).astype(np.int64, copy=False)
    conf = np.asarray(confidence, dtype=np.float64)
    n = xy.shape[0]
    if lab.shape != (n,) or conf.shape != (n,):
        raise GpfmError(f"labels and confidence must have shape ({n},): one per tile")
    if lab.size and lab.max() >= len(class_names):
        raise GpfmError(f"labels go up to {lab.max()} but there are {len(class_names)} class names")
    header = ["x", "y", "width", "height", "class", "confidence"]
    proba = None
    if probabilities is not None:
        proba = np.asarray(probabilities, dtype=np.float64)
        if proba.shape != (n, len(class_names)):
            raise GpfmError(f"probabilities must have shape ({n}, {len(class_names)})")
        header += [f"p_{name}" for name in class_names]
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for i in range(n):
        name = class_names[lab[i]] if lab[i] >= 0 else ""
        row = [int(xy[i, 0]), int(xy[i, 1]), tw, th, name, f"{conf[i]:.6g}"]
        if proba is not None:
            row += [f"{v:.6g}" for v in proba[i]]
        writer.writerow(row)
    return write_atomic(path, buf.getvalue())
