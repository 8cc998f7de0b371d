"""Slide -> one embedding per tile, streamed into an HDF5 file.

Tile grid -> :class:`~gpfm_core.tiling.TileBatchReader` (threads, one slide handle each,
bounded prefetch, so reading batch i+1 overlaps computing batch i) -> ``preprocess`` (on the
model's device) -> encoder -> :class:`~gpfm_core.embed.storage.EmbeddingWriter`. On CUDA:
bf16 autocast, channels-last, pinned host memory with non-blocking copies, results of
batch i fetched only after batch i+1 is queued, optional ``torch.compile``, and the batch
halves after an out-of-memory error. Memory stays bounded by a few batches whatever the
slide size.

:func:`iter_embed_slide` is a generator yielding :class:`EmbedProgress` after each batch
(the napari dock paints coverage from it) and returning an :class:`EmbedResult`;
:func:`embed_slide` drives it synchronously.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core.embed._attrs import file_attrs, reuse_key
from gpfm_core.embed._errors import EmbedCancelled, EmbeddingsClashError
from gpfm_core.embed._loop import embed_batches
from gpfm_core.embed.device import (
    OomBackoff,
    choose_cpu_precision,
    fidelity_sample,
    resolve_device,
    resolve_precision,
)
from gpfm_core.embed.layout import claim_slide_file, features_dir, settings_diff
from gpfm_core.embed.loading import EmbeddingsFileError, read_attrs
from gpfm_core.embed.storage import EmbeddingWriter
from gpfm_core.errors import GpfmError
from gpfm_core.tiling import NoTissueWarning

if TYPE_CHECKING:
    import torch

    from gpfm_core.tissue import TissueMask

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


__all__ = [
    "EmbedCancelled",
    "EmbedProgress",
    "EmbedResult",
    "NoTissueWarning",
    "embed_slide",
    "iter_embed_slide",
    "resolve_encoder",
]


@dataclass(frozen=True)
class EmbedProgress:
    """Sent after each batch: ``done`` of ``total`` tiles embedded.

    Attributes
    ----------
    done, total : int
        Tiles finished so far and in the grid.
    indices : np.ndarray
        (B,) int64 rows of the tile grid finished by this batch.
    features : np.ndarray
        (B, D) float32 their embeddings.
    grid : TileGrid
        The grid being embedded (the same object in every event), so a caller can paint
        coverage (``grid.grid_rc[indices]``) without tiling the slide again.
    """

    done: int
    total: int
    indices: np.ndarray
    features: np.ndarray
    grid: Any = None


@dataclass(frozen=True)
class EmbedResult:
    """What :func:`iter_embed_slide` returns.

    ``reused`` is True when an existing file matched and nothing was computed. ``stages``
    holds the seconds spent in each step that ran: ``encoder`` (build / move the model),
    ``open`` (open the slide, take its lock, look at an existing file), ``tiling`` (tissue
    detection and tile grid), ``embed`` (read, encode and write every batch), ``commit``
    (flush, fsync, rename).
    """

    path: Path
    n_tiles: int
    reused: bool
    encoder: str
    weights_hash: str
    device: str
    precision: str
    seconds: float
    batch_size: int
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        """Tiles per second over the whole call (0 when reused)."""
        return 0.0 if self.reused or self.seconds <= 0 else self.n_tiles / self.seconds


def resolve_encoder(encoder: Any, device: torch.device) -> Any:
    """An Encoder on ``device`` from ``"default"``, a registry name, a path, or an Encoder.

    Raises
    ------
    EncoderError
        Unknown name or unreadable weights (the registry lists the known names).
    """
    from gpfm_core.encoders import create_encoder

    if isinstance(encoder, str | os.PathLike):
        enc = create_encoder(encoder, device=str(device))  # "default" is resolved there
    elif hasattr(encoder, "meta") and callable(encoder):
        enc = encoder.to(device)
    else:
        raise GpfmError(
            f"encoder must be a name, a path or an Encoder, not {type(encoder).__name__}"
        )
    enc.eval()
    return enc


def iter_embed_slide(
    slide_path: PathLike,
    *,
    encoder: Any = "default",
    out_dir: PathLike,
    mpp: float | None = None,
    tile_px: int | None = None,
    overlap_px: int = 0,
    min_tissue: float = 0.25,
    tissue: TissueMask | bool | None = None,
    tissue_options: Mapping[str, Any] | None = None,
    slide_mpp: float | tuple[float, float] | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    dtype: str = "float32",
    precision: str = "auto",
    compile: bool = False,
    cancel: threading.Event | None = None,
    reuse: bool = True,
    force: bool = False,
    lock_timeout: float | None = None,
    unique_name: bool = False,
) -> Generator[EmbedProgress, None, EmbedResult]:
    """Embed every tissue tile of a slide into its feature file under ``out_dir``.

    The file is ``<out_dir>/<mpp>mpp_<tile_px>px_<overlap>px_overlap/features_<encoder>-
    <hash8>/<slide_stem>.h5`` (``<slide_stem>-<slide_id[:8]>.h5`` when another slide holds
    the stem; see :mod:`gpfm_core.embed.layout`). The slide's lock is held from the look for
    an existing file to the rename of the new one: a second process embedding the same slide
    waits, then reuses the finished file.

    Parameters
    ----------
    slide_path
        Any slide :func:`gpfm_core.slide.open_slide` reads.
    encoder
        ``"default"``, a registry name, a checkpoint path, or an Encoder module.
    out_dir
        Output root (created).
    mpp, tile_px
        Tiling resolution (µm/px) and tile side; None takes the encoder's
        ``meta.tile_mpp`` / ``meta.tile_px``.
    overlap_px, min_tissue
        Overlap between tiles (px at ``mpp``) and the least tissue fraction kept.
    tissue
        A :class:`~gpfm_core.tissue.TissueMask` to use (e.g. edited by the user), None to
        detect tissue, False for every tile.
    tissue_options
        Keyword arguments of :func:`~gpfm_core.tissue.detect_tissue` when tissue is detected
        (e.g. ``{"exclude_ink": False}`` keeps marker ink, ``{"modality": "fluorescence"}``);
        they are part of the reuse key, so a file made with other options is not reused.
    slide_mpp
        µm/px override for slides without (or with wrong) metadata.
    device, precision
        ``"auto"`` / ``"cpu"`` / ``"cuda[:N]"``. Precision ``"auto"`` is bf16 on CUDA; on CPU
        it is int8 (dynamic quantisation of the linear layers) when the encoder is mostly
        linear layers, the slide has >= 128 tiles (so int8 repays its check) and int8 proves
        faithful on the slide's own tiles, else fp32
        (:func:`~gpfm_core.embed.device.choose_cpu_precision`). ``"int8"`` asks for it (CPU
        only; still checked, fp32 with a warning when not faithful); ``"fp32"`` never uses it.
    batch_size, workers
        Tiles per batch and reader threads.
    dtype
        ``"float32"`` or ``"float16"`` features on disk.
    compile
        Wrap the model in ``torch.compile``.
    cancel
        Set it to stop after the current batch (or while waiting for the lock); raises
        :class:`EmbedCancelled`.
    reuse
        Return an existing file of this slide made with the same settings (encoder, weights,
        tiling, tissue detector and its parameters or mask, ``min_tissue``, µm/px override,
        dtype); False recomputes and replaces it.
    force
        Replace this slide's file when it was made with other settings; without it that is
        an :class:`EmbeddingsClashError`.
    lock_timeout
        Seconds to wait for another process writing this file; None waits until it is done.
    unique_name
        Write ``<slide_stem>-<slide_id[:8]>.h5`` even when ``<slide_stem>.h5`` is free (a
        cohort's later slide of a shared stem; see
        :func:`~gpfm_core.embed.layout.claim_slide_file`).

    Yields
    ------
    EmbedProgress
        After each batch: ``done``, ``total``, ``indices`` (B,), ``features`` (B, D).

    Returns
    -------
    EmbedResult
        ``path`` of the file, ``n_tiles``, ``reused`` ...

    Raises
    ------
    SlideError, EncoderError, GpfmError, EmbedCancelled
        Bad slide, unknown encoder, CUDA asked for but missing, cancelled.
    EmbeddingsClashError
        The file holds this slide made with other settings (and not ``force``), or both of its
        possible names hold other slides.
    EmbeddingsLockTimeout
        ``lock_timeout`` passed while another process wrote the file.
    """
    from gpfm_core.slide import open_slide
    from gpfm_core.tiling import check_tissue_options, make_tile_grid, read_tiles

    t0 = time.perf_counter()
    detector = check_tissue_options(tissue_options)
    if dtype not in ("float32", "float16"):
        raise GpfmError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
    if batch_size < 1 or workers < 0:
        raise GpfmError(f"batch_size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    enc = resolve_encoder(encoder, dev)
    stages: dict[str, float] = {"encoder": time.perf_counter() - t0}
    meta = enc.meta
    weights_hash = str(getattr(enc, "weights_hash", None) or "none")
    slide_path = Path(slide_path)
    key = reuse_key(
        meta,
        weights_hash,
        mpp=mpp,
        tile_px=tile_px,
        overlap_px=overlap_px,
        min_tissue=min_tissue,
        tissue=tissue,
        slide_mpp=slide_mpp,
        dtype=dtype,
        tissue_options=detector,
    )
    folder = features_dir(
        out_dir,
        encoder=key["encoder"],
        weights_hash=weights_hash,
        mpp=key["requested_mpp"],
        tile_px=key["tile_px"],
        overlap_px=key["overlap_px"],
    )

    def result(path: Path, n: int, reused: bool, bs: int, precision: str) -> EmbedResult:
        return EmbedResult(
            path,
            n,
            reused,
            str(meta.name),
            weights_hash,
            str(dev),
            precision,
            time.perf_counter() - t0,
            bs,
            dict(stages),
        )

    with contextlib.ExitStack() as locked:
        with open_slide(slide_path, mpp=slide_mpp) as slide:
            info = slide.info
            # held from the look for an existing file to the rename of the new one
            out = locked.enter_context(
                claim_slide_file(
                    folder,
                    slide_path,
                    info.slide_id,
                    timeout=lock_timeout,
                    cancel=cancel,
                    unique_name=unique_name,
                )
            )
            diff = _existing_diff(out, key)
            stages["open"] = time.perf_counter() - t0 - sum(stages.values())
            if diff is not None and not diff and reuse:
                attrs = read_attrs(out)
                n = int(attrs.get("n_tiles", -1))
                log.info("reusing %s (%d tiles, same slide and settings)", out, n)
                # the precision the file was computed in (int8 or fp32 on CPU is decided per slide)
                return result(out, n, True, batch_size, str(attrs.get("compute_precision", prec)))
            if diff and not force:
                raise EmbeddingsClashError(
                    f"cannot embed {slide_path} into {out}: that file holds this slide made with "
                    f"other settings ({'; '.join(diff)}); pass --force (force=True) to replace "
                    "it, or choose another output folder"
                )
            grid = make_tile_grid(
                slide,
                mpp=key["requested_mpp"],
                tile_px=key["tile_px"],
                overlap_px=overlap_px,
                min_tissue=min_tissue,
                tissue=tissue,
                tissue_options=detector,
            )
            stages["tiling"] = time.perf_counter() - t0 - sum(stages.values())
            # the CPU precision is settled on tiles of this slide (see choose_cpu_precision)
            check = dev.type == "cpu" and precision in ("auto", "int8") and len(grid) > 0
            sample = read_tiles(slide, grid, fidelity_sample(len(grid))) if check else None
        return (
            yield from _embed_into(
                out, grid, enc, meta, key, slide_path, info, dev, prec, t0, result, stages,
                batch_size=batch_size, workers=workers, dtype=dtype, slide_mpp=slide_mpp,
                compile=compile, cancel=cancel, min_tissue=min_tissue, precision=precision,
                sample=sample,
            )
        )  # fmt: skip


def _existing_diff(path: Path, key: dict[str, Any]) -> list[str] | None:
    """None when ``path`` does not exist; else how its settings differ from ``key`` ([] = same)."""
    if not path.exists():
        return None
    try:
        attrs = read_attrs(path)
    except EmbeddingsFileError as exc:
        return [f"unreadable: {exc}"]
    return settings_diff(attrs, key)


def _embed_into(
    out: Path,
    grid: Any,
    enc: Any,
    meta: Any,
    key: dict[str, Any],
    slide_path: Path,
    info: Any,
    dev: Any,
    prec: str,
    t0: float,
    result: Callable[[Path, int, bool, int, str], EmbedResult],
    stages: dict[str, float],
    *,
    batch_size: int,
    workers: int,
    dtype: str,
    slide_mpp: float | tuple[float, float] | None,
    compile: bool,
    cancel: threading.Event | None,
    min_tissue: float,
    precision: str,
    sample: np.ndarray | None,
) -> Generator[EmbedProgress, None, EmbedResult]:
    """Embed ``grid`` and write ``out`` (its lock is held by the caller); times go to ``stages``."""
    t_embed = time.perf_counter()
    model = enc
    if dev.type == "cpu":
        from gpfm_core.encoders import preprocess

        x = None if sample is None else preprocess(sample, meta)
        model, choice = choose_cpu_precision(
            enc, precision, x, n_tiles=len(grid), label=slide_path.name
        )
        prec = choice.precision
    root, coords_attrs, features_attrs = file_attrs(
        grid, meta, key["weights_hash"], key, slide_path, out.parent, info
    )
    root.update(compute_device=str(dev), compute_precision=prec)
    if dev.type == "cpu":
        root.update(choice.attrs())
    n = len(grid)
    with EmbeddingWriter(
        out,
        coords=grid.coords,
        grid_rc=grid.grid_rc,
        tissue_fraction=grid.tissue_fraction,
        ink_fraction=grid.ink_fraction,
        embed_dim=int(meta.embed_dim),
        dtype=dtype,
        attrs=root,
        coords_attrs=coords_attrs,
        features_attrs=features_attrs,
    ) as writer:
        backoff = OomBackoff(batch_size)
        if n == 0:
            warnings.warn(
                f"{slide_path.name}: no tile has >= {min_tissue:g} tissue; wrote an empty embeddings "
                f"file {out.name} (lower min_tissue or check the tissue mask)",
                NoTissueWarning,
                stacklevel=2,
            )
        else:
            batches = embed_batches(
                slide_path,
                grid,
                model,
                dev,
                prec,
                backoff,
                workers=workers,
                slide_mpp=slide_mpp,
                compile=compile,
            )
            done = 0
            try:
                for indices, feats in batches:
                    if cancel is not None and cancel.is_set():
                        raise EmbedCancelled(
                            f"embedding of {slide_path.name} cancelled; no file written"
                        )
                    writer.write(indices, feats)
                    done += len(indices)
                    yield EmbedProgress(done, n, indices, feats, grid)
                    if cancel is not None and cancel.is_set() and done < n:
                        raise EmbedCancelled(
                            f"embedding of {slide_path.name} cancelled; no file written"
                        )
            finally:
                batches.close()  # stops the reader threads, also when the caller closes us
        writer.set_attrs(
            {"seconds": time.perf_counter() - t0, "final_batch_size": backoff.batch_size}
        )
        t_commit = time.perf_counter()
        stages["embed"] = t_commit - t_embed
        path = writer.commit()
        stages["commit"] = time.perf_counter() - t_commit
    return result(path, n, False, backoff.batch_size, prec)


def embed_slide(
    slide_path: PathLike,
    *,
    out_dir: PathLike,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> Path:
    """Synchronous :func:`iter_embed_slide`; returns the path of the ``.h5`` file.

    Parameters
    ----------
    slide_path, out_dir, **kwargs
        As :func:`iter_embed_slide`.
    progress
        Called as ``progress(done, total)`` after each batch.
    """
    gen = iter_embed_slide(slide_path, out_dir=out_dir, **kwargs)
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            return stop.value.path
        if progress is not None:
            progress(ev.done, ev.total)
