"""Micro-batches from worker processes: a ``torch.utils.data.DataLoader`` over micro-steps.

Item ``s`` of :class:`MicroBatches` is the whole micro-batch of micro-step ``s``
(:func:`gpfm_core.train.data.make_batch`: its tiles, crops and masks), and the sampler yields
``start, start + 1, ...`` (:class:`~gpfm_core.train.sampler.MicroStepSampler`). So each worker
process reads and augments whole batches with one torch thread (the DataLoader sets that),
batches arrive in step order, and the data is the same for any number of workers, 0
(in-process) included. The loader draws its workers' base seed from a generator of its own,
never from the global torch RNG that drop-path uses, so building it does not shift the
training's random stream (resuming stays exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gpfm_core.train.data import TileDataset, make_batch
from gpfm_core.train.sampler import MicroStepSampler

__all__ = ["MicroBatches", "iterate", "make_loader"]


class MicroBatches:
    """Map-style dataset: micro-step number -> micro-batch dict (see ``make_batch``).

    Parameters
    ----------
    dataset : TileDataset
    augment : callable
        ``(tile, key) -> crops`` (:class:`~gpfm_core.train.augment.MultiCropAugment`).
    **batch_kw
        ``seed``, ``batch_size``, ``rank``, ``world_size``, ``patch_size``,
        ``mask_probability``, ``mask_ratio`` of :func:`make_batch`.
    """

    def __init__(self, dataset: TileDataset, augment: Any, **batch_kw: Any) -> None:
        self.dataset = dataset
        self.augment = augment
        self.batch_kw = batch_kw

    def __getitem__(self, step: int) -> dict[str, Any]:
        return make_batch(self.dataset, self.augment, step=int(step), **self.batch_kw)


def make_loader(
    batches: MicroBatches,
    *,
    start: int,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    prefetch: int = 2,
) -> Any:
    """A DataLoader yielding the micro-batches of micro-steps ``start, start + 1, ...``.

    Parameters
    ----------
    batches : MicroBatches
    start : int
        First micro-step.
    num_workers : int
        Worker processes (0: built in this process).
    seed : int
        Seeds the loader's own generator (workers' base seed); the data does not depend on it.
    pin_memory : bool
        Page-locked batches for a faster copy to CUDA.
    prefetch : int
        Batches prepared ahead per worker.
    """
    import torch
    from torch.utils.data import DataLoader

    workers = max(0, int(num_workers))
    return DataLoader(
        batches,  # type: ignore[arg-type]
        batch_size=None,  # an item is already a whole micro-batch
        sampler=MicroStepSampler(start),  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        generator=torch.Generator().manual_seed(int(seed)),
    )


def iterate(loader: Any) -> Iterator[dict[str, Any]]:
    """Iterate ``loader``, shutting its workers down when the generator is closed."""
    it = iter(loader)
    try:
        yield from it
    finally:
        del it  # the DataLoader iterator stops its worker processes when it is freed
