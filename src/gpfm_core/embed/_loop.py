"""The compute loop: batches of tiles -> features, overlapping reads, copies and compute."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core.embed.device import OomBackoff, autocast

if TYPE_CHECKING:
    import torch

    from gpfm_core.tiling import TileGrid


def embed_batches(
    slide_path: Path,
    grid: TileGrid,
    enc: Any,
    dev: torch.device,
    precision: str,
    backoff: OomBackoff,
    *,
    workers: int,
    slide_mpp: float | tuple[float, float] | None,
    compile: bool,
) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
    """Yield ``(indices (B,), features (B, D) float32)`` for every tile of ``grid``.

    On CUDA the features of batch i are copied back only once batch i+1 has been queued,
    so the GPU never waits for the host to write.
    """
    import torch

    from gpfm_core.encoders import preprocess

    try:  # architecture.md: the reader lives in gpfm_core/reader.py, re-exported by tiling
        from gpfm_core.reader import TileBatchReader
    except ImportError:
        from gpfm_core.tiling import TileBatchReader  # type: ignore[attr-defined,no-redef]

    cuda = dev.type == "cuda"
    model = enc
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    pending: tuple[np.ndarray, torch.Tensor, Any] | None = None

    def compute(tiles: np.ndarray) -> tuple[torch.Tensor, Any]:
        """(B, px, px, 3) uint8 -> (B, D) float32 on the host (+ a CUDA event to wait on)."""
        # inference_mode / autocast are thread-local: enter them here, never across a yield
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(tiles))
            if cuda:
                t = t.pin_memory()
            x = preprocess(t, enc.meta, device=dev)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, precision):
                feats = backoff.run(model, x)
            feats = feats.float()
            if not cuda:
                return feats, None
            host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(feats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event

    def finish(item: tuple[np.ndarray, torch.Tensor, Any]) -> tuple[np.ndarray, np.ndarray]:
        idx, host, event = item
        if event is not None:
            event.synchronize()
        return np.asarray(idx, dtype=np.int64), host.numpy()

    reader = TileBatchReader(
        slide_path, grid, batch_size=backoff.batch_size, workers=workers, slide_mpp=slide_mpp
    )
    with reader:
        for indices, tiles in reader:
            host, event = compute(tiles)
            if pending is not None:  # CUDA: batch i is read back once batch i+1 is queued
                yield finish(pending)
            pending = (indices, host, event)
            if not cuda:
                yield finish(pending)
                pending = None
        if pending is not None:
            yield finish(pending)
