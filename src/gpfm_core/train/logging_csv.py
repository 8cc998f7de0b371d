"""Per-step metrics: a CSV file (every loss term, lr, wd, momentum, tiles/s) and TensorBoard.

Under torchrun each rank computes its loss terms on its own micro-batches; the logged values
are their mean over ranks (:func:`reduce_across_ranks`, one all-reduce per logged step), as
GPFM's ``train.py`` logs ``loss_dict_reduced``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpfm_core._atomic import atomic_path

__all__ = ["MetricsLogger", "read_metrics", "reduce_across_ranks"]

log = logging.getLogger(__name__)


class MetricsLogger:
    """Append rows to ``<out>/<name>``; on resume, rows after ``resume_step`` are dropped.

    Parameters
    ----------
    out_dir : path-like
        Run folder.
    columns : list of str
        Column order (``step`` first); fixed for the run.
    resume_step : int, optional
        Keep existing rows with ``step <= resume_step`` (None: start a new file).
    tensorboard : bool
        Also write TensorBoard scalars (``<out>/tensorboard``) when ``torch.utils.tensorboard``
        is importable.
    name : str
        CSV file name (``metrics.csv``; the evaluation hook writes ``eval.csv``).
    tb_prefix : str
        Prefix of the TensorBoard tags (e.g. ``"eval/"``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        columns: list[str],
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        name: str = "metrics.csv",
        tb_prefix: str = "",
    ) -> None:
        self.path = Path(out_dir) / name
        self.tb_prefix = tb_prefix
        self.columns = columns
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            rows = [r for r in read_metrics(self.path) if int(r["step"]) <= resume_step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self._fh = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self._writer = csv.DictWriter(self._fh, fieldnames=columns, extrasaction="ignore")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (floats with full precision) and flush."""
        self._writer.writerow(
            {k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()}
        )
        self._fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(self.tb_prefix + k, v, int(row["step"]))
            self._tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a metrics CSV as dicts of strings."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def reduce_across_ranks(
    values: dict[str, Any], *, mean: Iterable[str] = (), total: Iterable[str] = ()
) -> dict[str, Any]:
    """``values`` with the ``mean`` keys averaged and the ``total`` keys summed over ranks.

    A collective when a process group is initialised (every rank calls it at the same
    step); otherwise ``values`` unchanged. Keys absent from ``values`` are ignored.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    avg = [k for k in mean if k in values]
    tot = [k for k in total if k in values]
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(values[k]) for k in (*avg, *tot)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    out = dict(values)
    world = dist.get_world_size()
    for i, k in enumerate(avg):
        out[k] = float(t[i]) / world
    for i, k in enumerate(tot, start=len(avg)):
        out[k] = round(float(t[i])) if isinstance(values[k], int) else float(t[i])
    return out
