"""Device choice, mixed precision, and CUDA out-of-memory back-off for the embedding loop.

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Precision names accepted by :func:`resolve_precision`.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` into a usable torch device.

    Raises
    ------
    GpfmError
        CUDA asked for but not usable, or an unknown device name; one line.
    """
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = torch.version.cuda or "CPU-only"
            raise GpfmError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"CUDA build {build}, no usable GPU); use --device cpu or --device auto"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GpfmError(
                f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible; "
                "use cuda:0 ... or check CUDA_VISIBLE_DEVICES"
            )
        return dev
    raise GpfmError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Compute precision for ``device``: ``"auto"`` is bf16 on CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise GpfmError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise GpfmError(
            f"precision {precision} needs a CUDA device; use precision='fp32' on {device.type}"
        )
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """An autocast context for ``precision`` (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class CudaOutOfMemory(GpfmError):
    """The model does not fit on the GPU even one tile at a time."""


class OomBackoff:
    """Run a batched callable, halving the batch after a CUDA out-of-memory error.

    The halved size is kept for later batches, so a job that ran out of memory once
    does not pay for the failed attempt again.

    Parameters
    ----------
    batch_size
        Largest number of rows passed to the callable at once.
    on_oom
        Called after each out-of-memory error, before the retry (default: empty the
        CUDA cache when CUDA is available).

    Examples
    --------
    >>> backoff = OomBackoff(64)                           # doctest: +SKIP
    >>> feats = backoff.run(model, x)                      # x (B, 3, S, S) -> (B, D)
    """

    def __init__(self, batch_size: int, *, on_oom: Callable[[], None] | None = None) -> None:
        if batch_size < 1:
            raise GpfmError(f"batch_size must be >= 1, not {batch_size}")
        self.batch_size = int(batch_size)
        self.oom_count = 0
        self._on_oom = on_oom if on_oom is not None else _empty_cuda_cache

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Return ``fn(x)`` computed in chunks of at most :attr:`batch_size` rows.

        Parameters
        ----------
        fn
            Maps (b, ...) to (b, ...) rows independently (a model in eval mode).
        x
            (B, ...) input.

        Returns
        -------
        torch.Tensor
            (B, ...) concatenated outputs, equal to ``fn(x)``.

        Raises
        ------
        CudaOutOfMemory
            When even one row does not fit.
        """
        import torch

        n = int(x.shape[0])
        while True:
            try:
                outs = [fn(x[s]) for s in self._chunks(n)]
                return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
            except torch.cuda.OutOfMemoryError:
                self.oom_count += 1
                outs = []  # drop partial results before retrying
                if self.batch_size == 1:
                    raise CudaOutOfMemory(
                        "CUDA out of memory with a batch of one tile; use a smaller encoder, "
                        "free the GPU, or use --device cpu"
                    ) from None
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("CUDA out of memory; retrying with batch size %d", self.batch_size)
                self._on_oom()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
