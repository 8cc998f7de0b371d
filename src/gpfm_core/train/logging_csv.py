"""Per-step metrics: a CSV file (every loss term, lr, wd, momentum, tiles/s), optional TensorBoard."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from gpfm_core._atomic import atomic_path

__all__ = ["MetricsLogger", "read_metrics"]

log = logging.getLogger(__name__)


class MetricsLogger:
    """Append rows to ``<out>/metrics.csv``; on resume, rows after ``resume_step`` are dropped.

    Parameters
    ----------
    out_dir : path-like
        Run folder.
    columns : list of str
        Column order (``step`` first); fixed for the run.
    resume_step : int, optional
        Keep existing rows with ``step <= resume_step`` (None: start a new file).
    tensorboard : bool
        Also write TensorBoard scalars when ``torch.utils.tensorboard`` is importable.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        columns: list[str],
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.path = Path(out_dir) / "metrics.csv"
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
                    self._tb.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a metrics CSV as dicts of strings."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
