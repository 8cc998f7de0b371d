"""Embed a cohort: plan, one task per slide (inline or on dask.distributed), retries, a report.

:func:`run_cohort` is what ``gpfm embed`` runs:

1. **Plan** (:func:`plan_cohort`): a slide whose row in the cohort table
   (:mod:`gpfm_core.cohort.table`) has the same settings, and whose slide and feature file
   still have the size and mtime recorded there, is ``skipped``; a slide that does not exist
   is ``failed`` at once. Two ``stat`` calls a slide, nothing opened: 10,000 slides plan in
   well under 5 s.
2. **Embed** the rest, one task per slide (:func:`embed_cohort_slide`): the worker that owns
   a slide opens it, reads, embeds and writes its tiles; only the slide's path and the
   settings go to it and only a small :class:`SlideReport` comes back (never tiles). Inline
   (this process, one slide after another) or on a dask cluster
   (:mod:`gpfm_core.cohort.distributed`). The per-slide lock
   (:func:`gpfm_core.embed.layout.claim_slide_file`) keeps two workers or two runs off one
   slide: the second waits and reuses the file (status ``reused``).
3. **Retry** a slide that failed for a reason that may pass (a worker that died, an I/O
   error, out of memory) up to ``retries`` more times; a slide that fails for a reason that
   will not pass (:class:`~gpfm_core.errors.GpfmError`: not a slide, no µm/px, settings
   clash) fails at once. A worker killed mid-slide leaves only a temporary file (renamed
   atomically only when complete), which the next writer of that slide removes.
4. **Report**: a CSV, one row per slide (status ``embedded`` / ``reused`` / ``skipped`` /
   ``failed`` / ``cancelled``, tiles, attempts, seconds per stage, worker, error), written
   atomically at the end, and the cohort table updated (at the end and every
   ``table_flush_s``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core._atomic import write_atomic
from gpfm_core.cohort.manifest import CohortEntry
from gpfm_core.cohort.table import (
    TableRow,
    read_table,
    row_for_file,
    settings_hash,
    table_path,
    update_table,
)
from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    from gpfm_core.encoders import EncoderMeta

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "STAGES",
    "CohortPlan",
    "CohortRun",
    "EmbedSettings",
    "SlideReport",
    "embed_cohort_slide",
    "plan_cohort",
    "quiet_no_tissue",
    "run_cohort",
    "write_report",
]

#: Stages timed per slide (``EmbedResult.stages``), in order; ``hash`` is the table row.
STAGES: tuple[str, ...] = ("encoder", "open", "tiling", "embed", "commit", "hash")
REPORT_DIR = "reports"


@dataclass(frozen=True)
class EmbedSettings:
    """How every slide of a cohort is embedded (sent to each task; small and picklable).

    Fields are :func:`gpfm_core.embed.iter_embed_slide`'s options of the same names;
    ``encoder`` is a registry name or a checkpoint path (workers build their own encoder
    from it, with ``weights`` when given), ``torch_threads`` sets ``torch.set_num_threads``
    on a worker (None leaves it), ``quiet_empty`` leaves out the "no tissue" warnings on dask
    workers (the report says ``0 tiles``, note ``no tissue``; ``gpfm embed`` sets it, and
    runs inline slides inside :func:`quiet_no_tissue`).
    """

    encoder: str = "default"
    weights: str | None = None
    mpp: float | None = None
    tile_px: int | None = None
    overlap_px: int = 0
    min_tissue: float = 0.25
    tissue_options: dict[str, Any] | None = None  # detect_tissue overrides (--keep-ink ...)
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    workers: int = 2
    dtype: str = "float32"
    compile: bool = False
    reuse: bool = True
    force: bool = False
    torch_threads: int | None = None
    quiet_empty: bool = False

    def check(self, meta: EncoderMeta | None = None) -> None:
        """Raise :class:`GpfmError` for settings no slide can be embedded with (once, up front).

        ``meta`` gives the encoder's default tile size, against which ``overlap_px`` is
        checked when ``tile_px`` is None.
        """
        from gpfm_core.tiling import check_grid_args

        tile_px = self.tile_px if self.tile_px is not None else getattr(meta, "tile_px", None)
        check_grid_args(
            mpp=self.mpp,
            tile_px=tile_px if tile_px is not None else max(self.overlap_px, 0) + 1,
            overlap_px=self.overlap_px,
            min_tissue=self.min_tissue,
        )
        if self.dtype not in ("float32", "float16"):
            raise GpfmError(f"dtype must be 'float32' or 'float16', not {self.dtype!r}")
        if self.batch_size < 1:
            raise GpfmError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.workers < 0:
            raise GpfmError(f"workers must be >= 0, not {self.workers}")

    def embed_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~gpfm_core.embed.iter_embed_slide` (not the encoder)."""
        return {
            "mpp": self.mpp,
            "tile_px": self.tile_px,
            "overlap_px": self.overlap_px,
            "min_tissue": self.min_tissue,
            "tissue_options": self.tissue_options,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "dtype": self.dtype,
            "compile": self.compile,
            # force: every slide is redone, also a file of the same settings (e.g. computed
            # in int8 where fp32 is now wanted: precision is not part of the reuse key)
            "reuse": self.reuse and not self.force,
            "force": self.force,
        }


@dataclass
class SlideReport:
    """What happened to one slide (a row of the run report).

    Attributes
    ----------
    slide_id, slide_path
        The slide's name in the cohort and its file.
    status
        ``"embedded"`` (computed now), ``"reused"`` (a matching file was found by the
        worker, e.g. written by another run), ``"skipped"`` (done before, per the cohort
        table; not scheduled), ``"failed"``, or ``"cancelled"`` (the run was interrupted).
    n_tiles
        Tiles in the file (-1 when unknown).
    attempts
        Tries made (0 for skipped).
    seconds
        Wall time of the last try on its worker.
    stages
        Seconds per stage of the last try (:data:`STAGES`).
    queue_s
        Seconds from submission to start on the worker (the scheduler's share).
    worker, pid
        Where the last try ran (``"inline"`` in this process).
    file
        The feature file, or "".
    precision
        What the features were computed in (``"fp32"``, ``"int8"``, ``"bf16"``...; "" when
        not known, e.g. skipped).
    error
        One line, for ``failed``.
    note
        ``"no tissue"`` for a slide embedded with 0 tiles (an empty feature file), else "".
    retryable
        Whether a failure may pass on another try (not written to the report).
    row
        The cohort-table row of the file (not written to the report).
    """

    slide_id: str
    slide_path: str
    status: str
    n_tiles: int = -1
    attempts: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    queue_s: float = 0.0
    worker: str = ""
    pid: int = 0
    file: str = ""
    precision: str = ""
    error: str = ""
    note: str = ""
    retryable: bool = False
    row: TableRow | None = None
    started: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the slide has its feature file."""
        return self.status in ("embedded", "reused", "skipped")

    def csv_row(self) -> dict[str, str]:
        """The report row (strings)."""
        out = {
            "slide_id": self.slide_id,
            "status": self.status,
            "n_tiles": str(self.n_tiles),
            "attempts": str(self.attempts),
            "seconds": f"{self.seconds:.3f}",
            "queue_s": f"{self.queue_s:.3f}",
        }
        for stage in STAGES:
            value = self.stages.get(stage)
            out[f"{stage}_s"] = "" if value is None else f"{value:.3f}"
        out.update(
            worker=self.worker,
            pid=str(self.pid),
            file=self.file,
            precision=self.precision,
            slide_path=self.slide_path,
            error=self.error,
            note=self.note,
        )
        return out


REPORT_COLUMNS: tuple[str, ...] = tuple(SlideReport("", "", "").csv_row())


@dataclass(frozen=True)
class CohortPlan:
    """What :func:`plan_cohort` decided: ``todo`` entries, and reports of the rest.

    ``entries`` is the whole cohort as planned: a default-named slide whose name the cohort
    table already gives another slide file is renamed ``<stem>-<id8>``.
    """

    todo: list[CohortEntry]
    settled: list[SlideReport]
    settings: dict[Path, str]
    entries: list[CohortEntry] = field(default_factory=list)


@dataclass
class CohortRun:
    """The outcome of :func:`run_cohort`.

    Attributes
    ----------
    reports
        One :class:`SlideReport` per slide, in the cohort's order.
    report_path
        The run report (CSV).
    table_path
        The cohort table.
    executor
        ``"inline"``, ``"local:N"`` or the scheduler's address.
    dashboard
        The dask dashboard link, or None.
    seconds
        Wall time of the whole run (planning included).
    encoder, weights_hash
        The encoder's name and weights hash.
    indexes
        With ``index=True``: what was done to each cohort index (folder -> IndexUpdate).
    index_errors
        With ``index=True``: one line per index that could not be updated.
    """

    reports: list[SlideReport]
    report_path: Path | None
    table_path: Path | None
    executor: str
    dashboard: str | None = None
    seconds: float = 0.0
    encoder: str = ""
    weights_hash: str = ""
    indexes: dict[Path, Any] = field(default_factory=dict)
    index_errors: dict[Path, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[SlideReport]:
        """Slides that have no feature file after the run."""
        return [r for r in self.reports if not r.ok]

    def count(self, status: str) -> int:
        """How many slides ended with ``status``."""
        return sum(r.status == status for r in self.reports)


# ----------------------------------------------------------------------------- planning
def _key_factory(
    meta: EncoderMeta, weights_hash: str, settings: EmbedSettings
) -> Callable[[float | None], str]:
    """slide µm/px override -> settings hash; computed once per distinct override."""
    from gpfm_core.embed._attrs import reuse_key

    cache: dict[float | None, str] = {}

    def key_of(slide_mpp: float | None) -> str:
        if slide_mpp not in cache:
            cache[slide_mpp] = settings_hash(
                reuse_key(
                    meta,
                    weights_hash,
                    mpp=settings.mpp,
                    tile_px=settings.tile_px,
                    overlap_px=settings.overlap_px,
                    min_tissue=settings.min_tissue,
                    tissue=None,
                    slide_mpp=slide_mpp,
                    dtype=settings.dtype,
                    tissue_options=settings.tissue_options,
                )
            )
        return cache[slide_mpp]

    return key_of


def plan_cohort(
    entries: Sequence[CohortEntry],
    out_dir: PathLike,
    *,
    meta: EncoderMeta,
    weights_hash: str,
    settings: EmbedSettings,
) -> CohortPlan:
    """Decide which slides need work, opening nothing (two ``stat`` calls a slide).

    Parameters
    ----------
    entries
        The cohort.
    out_dir
        The cohort folder (its ``cohort.csv`` is read).
    meta, weights_hash
        The encoder's :class:`~gpfm_core.encoders.EncoderMeta` and weights hash.
    settings
        The run's settings; with ``reuse=False`` or ``force=True`` every slide is redone.

    Returns
    -------
    CohortPlan
        ``todo`` (to embed), ``settled`` (``skipped`` or ``failed`` reports: done before,
        or no such file) and the settings hash of each slide.
    """
    key_of = _key_factory(meta, weights_hash, settings)
    folder = Path(out_dir)
    folder_text = str(folder)
    known: dict[tuple[str, str], TableRow] = {}
    rows = read_table(folder)
    if settings.reuse and not settings.force:
        for row in rows:
            known[(row.slide_path, row.settings)] = row
    entries = _rename_defaults(entries, rows, meta=meta, weights_hash=weights_hash)
    todo: list[CohortEntry] = []
    settled: list[SlideReport] = []
    hashes: dict[Path, str] = {}
    for entry in entries:
        key = key_of(entry.mpp)
        hashes[entry.path] = key
        path_text = str(entry.path)
        try:
            st = os.stat(path_text)
        except FileNotFoundError:
            settled.append(
                SlideReport(
                    entry.slide_id,
                    path_text,
                    "failed",
                    error=f"{path_text} does not exist; fix the path",
                )
            )
            continue
        except OSError as exc:
            settled.append(
                SlideReport(entry.slide_id, path_text, "failed", error=f"{path_text}: {exc}")
            )
            continue
        row = known.get((path_text, key))
        file = os.path.join(folder_text, row.file) if row is not None else ""
        if row is not None and _row_current(row, file, st):
            settled.append(
                SlideReport(
                    entry.slide_id, path_text, "skipped", n_tiles=row.n_tiles, file=file, row=row
                )
            )
        else:
            todo.append(entry)
    return CohortPlan(todo, settled, hashes, entries)


def _rename_defaults(
    entries: Sequence[CohortEntry],
    rows: Sequence[TableRow],
    *,
    meta: EncoderMeta,
    weights_hash: str,
) -> list[CohortEntry]:
    """Default-named slides whose name the table gives another slide: ``<stem>-<id8>``.

    Another slide means other contents at another path; the same contents at another path
    (a moved file, a DICOM series given by its folder or by one of its files) keep the name.

    ``gpfm embed site-a/S01.svs`` then ``gpfm embed site-b/S01.svs`` into one folder: the
    second is another slide, not a new version of the first, so it must not take over (and
    supersede) the first's row; like a later same-stem slide of one run it is named
    ``<stem>-<id8>`` and its file too. A manifest's ``slide_id`` is the user's: the same name
    on another file supersedes the old row (:func:`~gpfm_core.cohort.table.update_table`).
    """
    import dataclasses

    from gpfm_core.cohort.manifest import slide_content_id, unique_slide_id

    taken = {
        r.slide_id: r
        for r in rows
        if r.encoder == str(meta.name) and r.weights_hash == weights_hash
    }
    out = []
    for e in entries:
        other = taken.get(e.slide_id)
        if e.default_id and other is not None and other.slide_path != os.path.abspath(e.path):
            # the same slide by another path (moved, or a DICOM series by its folder or
            # another of its files) keeps its name; only other contents are renamed
            content_id = slide_content_id(e.path)
            if content_id is None or content_id != other.content_id:
                e = dataclasses.replace(
                    e, slide_id=unique_slide_id(e.path, content_id), unique_name=True
                )
        out.append(e)
    return out


def _row_current(row: TableRow, file: str, slide_stat: os.stat_result) -> bool:
    if (row.slide_size, row.slide_mtime_ns) != (slide_stat.st_size, slide_stat.st_mtime_ns):
        return False
    try:
        fst = os.stat(file)
    except OSError:
        return False
    return (row.file_size, row.file_mtime_ns) == (fst.st_size, fst.st_mtime_ns)


# ----------------------------------------------------------------------------- one slide
_ENCODERS: dict[tuple[Any, ...], Any] = {}
_ENCODERS_LOCK = threading.Lock()


def _task_encoder(settings: EmbedSettings, device: str) -> Any:
    """The encoder of this worker thread (built once per thread, settings and device).

    Built under a process-wide lock: worker threads of one process that build at once
    would import timm / torch submodules concurrently, which Python may answer with a
    partially initialised module.
    """
    key = (settings.encoder, settings.weights, device, threading.get_ident())
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(key)
        if enc is None:
            from gpfm_core.embed import resolve_device, resolve_encoder
            from gpfm_core.encoders import create_encoder

            dev = resolve_device(device)
            spec: Any = settings.encoder
            if settings.weights is not None:
                spec = create_encoder(settings.encoder, weights=settings.weights, device="cpu")
            enc = resolve_encoder(spec, dev)
            _ENCODERS[key] = enc
    return enc


# The first slide a process embeds imports the slide / tissue / tiling stack lazily
# (scikit-image's lazy submodules among them). Two worker threads doing that at once can
# meet a partially initialised module (Python's import deadlock avoidance), so the first
# slide of each process runs alone; after one slide is embedded, slides run freely.
_WARM = threading.Event()
_WARM_LOCK = threading.Lock()


_QUIET_LOCK = threading.Lock()
_QUIET = False


class _NoTissueRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from gpfm_core.tissue import NO_TISSUE_RECORD

        return not getattr(record, NO_TISSUE_RECORD, False)


@contextlib.contextmanager
def quiet_no_tissue() -> Iterator[None]:
    """Leave out the "no tissue" warnings and log lines inside the block.

    For a caller that states it per slide from the report (``0 tiles``, note ``no tissue``):
    ``gpfm embed`` then prints one line for an empty slide, not three. Enter it in the main
    thread around a whole run (warning filters are per process, not per thread); the filters
    are restored on exit. On dask worker processes ``EmbedSettings.quiet_empty`` does the
    same for the worker's life.
    """
    import warnings

    from gpfm_core.tiling import NoTissueWarning

    records = _NoTissueRecords()
    tissue_log = logging.getLogger("gpfm_core.tissue")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NoTissueWarning)
        tissue_log.addFilter(records)
        try:
            yield
        finally:
            tissue_log.removeFilter(records)


def _quiet_worker() -> None:
    """:func:`quiet_no_tissue` for the rest of this (dask worker) process; once."""
    global _QUIET
    import multiprocessing
    import warnings

    from gpfm_core.tiling import NoTissueWarning

    if multiprocessing.parent_process() is None:
        # a threads-only cluster in the caller's own process (LocalCluster(processes=False)):
        # its filters would outlive the run there; quiet_no_tissue covers the caller's run
        return
    with _QUIET_LOCK:
        if not _QUIET:
            warnings.filterwarnings("ignore", category=NoTissueWarning)
            logging.getLogger("gpfm_core.tissue").addFilter(_NoTissueRecords())
            _QUIET = True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def embed_cohort_slide(
    entry: CohortEntry,
    settings: EmbedSettings,
    out_dir: str,
    settings_key: str,
    *,
    encoder: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    topic: str | None = None,
    submitted: float | None = None,
) -> SlideReport:
    """Embed one slide of a cohort where this function runs (a dask worker, or inline).

    Never raises for a slide that fails: the report says ``failed`` and whether another
    try may help (``retryable``). Only the report travels back to the caller.

    Parameters
    ----------
    entry
        The slide.
    settings
        The run's settings.
    out_dir
        The cohort folder.
    settings_key
        The settings hash of this slide (its cohort-table ``settings``).
    encoder
        An encoder to use (inline runs); None builds (once per worker thread) the encoder
        named by ``settings``.
    progress
        Called as ``progress(slide_id, done, total)`` after each batch (inline runs).
    topic
        On a dask worker: the event topic progress is published to (at most twice a second
        per slide, and at the end).
    submitted
        ``time.time()`` when the task was submitted, for ``queue_s``.
    """
    if not _WARM.is_set():
        with _WARM_LOCK:
            if not _WARM.is_set():
                report = _embed_one(entry, settings, out_dir, settings_key, encoder=encoder,
                                    progress=progress, topic=topic, submitted=submitted)  # fmt: skip
                if report.status == "embedded":
                    _WARM.set()
                return report
    return _embed_one(entry, settings, out_dir, settings_key, encoder=encoder,
                      progress=progress, topic=topic, submitted=submitted)  # fmt: skip


def _embed_one(
    entry: CohortEntry,
    settings: EmbedSettings,
    out_dir: str,
    settings_key: str,
    *,
    encoder: Any,
    progress: Callable[[str, int, int], None] | None,
    topic: str | None,
    submitted: float | None,
) -> SlideReport:
    """:func:`embed_cohort_slide` without the first-slide gate."""
    from gpfm_core.cohort.distributed import ProgressPublisher, worker_device, worker_name
    from gpfm_core.embed import EmbedCancelled, iter_embed_slide

    started = time.time()
    t0 = time.perf_counter()
    report = SlideReport(
        entry.slide_id,
        str(entry.path),
        "failed",
        attempts=1,
        queue_s=max(0.0, started - submitted) if submitted else 0.0,
        worker=worker_name(),
        pid=os.getpid(),
        started=started,
    )
    publish = ProgressPublisher(topic, entry.slide_id) if topic else None
    if settings.quiet_empty and topic is not None:  # a dask worker: its own process's output
        _quiet_worker()
    try:
        if settings.torch_threads:
            import torch

            if torch.get_num_threads() != settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
        device = worker_device(settings.device) if encoder is None else settings.device
        enc = encoder if encoder is not None else _task_encoder(settings, device)
        gen = iter_embed_slide(
            entry.path,
            encoder=enc,
            out_dir=out_dir,
            slide_mpp=entry.mpp,
            device=device,
            unique_name=entry.unique_name,
            **settings.embed_kwargs(),
        )
        while True:
            try:
                ev = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            if progress is not None:
                progress(entry.slide_id, ev.done, ev.total)
            if publish is not None:
                publish(ev.done, ev.total)
        t_hash = time.perf_counter()
        row = row_for_file(
            result.path,
            out_dir,
            slide_id=entry.slide_id,
            slide_path=entry.path,
            settings=settings_key,
        )
        report.stages = {**result.stages, "hash": time.perf_counter() - t_hash}
        report.status = "reused" if result.reused else "embedded"
        report.n_tiles = int(result.n_tiles)
        report.note = "no tissue" if report.n_tiles == 0 else ""
        report.file = str(result.path)
        report.precision = str(result.precision)
        report.row = row
        if publish is not None:
            publish(result.n_tiles, result.n_tiles, final=True)
    except EmbedCancelled:
        raise
    except GpfmError as exc:  # bad input: the same every time
        report.error = _one_line(exc)
    except Exception as exc:  # may pass: I/O, memory, a device hiccup
        report.error = f"{type(exc).__name__}: {_one_line(exc)}"
        report.retryable = True
        log.warning("%s: %s", entry.path, report.error, exc_info=log.isEnabledFor(10))
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- the run
class _Collector:
    """Collects reports; flushes finished rows into the cohort table now and then."""

    def __init__(
        self,
        out_dir: Path,
        *,
        flush_s: float,
        on_result: Callable[[SlideReport], None] | None,
        on_slide_done: Callable[[Path], None] | None,
        on_removed: Callable[[list[Path]], None] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.flush_s = flush_s
        self.on_result = on_result
        self.on_slide_done = on_slide_done
        self.on_removed = on_removed
        self.final: dict[str, SlideReport] = {}
        self.pending: list[TableRow] = []
        self.last_flush = time.monotonic()

    def settle(self, report: SlideReport) -> None:
        self.final[report.slide_id] = report
        if report.row is not None and report.status in ("embedded", "reused"):
            self.pending.append(report.row)
        if report.status in ("embedded", "reused") and self.on_slide_done is not None:
            self.on_slide_done(Path(report.file))
        if self.on_result is not None:
            self.on_result(report)
        if self.pending and time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> Path | None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return None
        rows, self.pending = self.pending, []
        return update_table(self.out_dir, rows, on_removed=self.on_removed)


def _encoder_for_plan(
    settings: EmbedSettings, encoder: Any, *, inline: bool
) -> tuple[Any, Any, str]:
    """(encoder, meta, weights hash): resolved here once, so errors come first.

    Inline, on the run's device (it embeds every slide). For a cluster only its name and
    weights hash are needed here, on the CPU: the client (a login node) may have no GPU;
    the workers check their own device when they build the encoder.
    """
    from gpfm_core.embed import resolve_device, resolve_encoder, resolve_precision
    from gpfm_core.encoders import create_encoder

    if encoder is None:
        encoder = (
            create_encoder(settings.encoder, weights=settings.weights, device="cpu")
            if settings.weights is not None
            else settings.encoder
        )
    dev = resolve_device(settings.device if inline else "cpu")
    if inline:
        resolve_precision(settings.precision, dev)
    enc = resolve_encoder(encoder, dev)
    return enc, enc.meta, str(getattr(enc, "weights_hash", None) or "none")


def run_cohort(
    entries: Iterable[CohortEntry],
    *,
    out_dir: PathLike,
    settings: EmbedSettings | None = None,
    encoder: Any = None,
    executor: Any = "inline",
    retries: int = 2,
    report_path: PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    on_result: Callable[[SlideReport], None] | None = None,
    on_slide_done: Callable[[Path], None] | None = None,
    on_plan: Callable[[CohortPlan], None] | None = None,
    on_dashboard: Callable[[str | None], None] | None = None,
    table_flush_s: float = 60.0,
    index: bool = False,
) -> CohortRun:
    """Embed every slide of a cohort into ``out_dir``; returns the run's reports.

    Parameters
    ----------
    entries
        The slides (:func:`gpfm_core.cohort.read_cohort_inputs`).
    out_dir
        The cohort folder: feature files in TRIDENT's layout, ``cohort.csv``, ``reports/``.
    settings
        How to embed (:class:`EmbedSettings`; default: the default encoder's tiling).
    encoder
        An encoder object to use inline instead of building ``settings.encoder`` (dask
        workers always build their own from ``settings``).
    executor
        ``"inline"`` (this process, one slide after another), ``"local"`` / ``"local:N"``
        (a ``dask.distributed.LocalCluster`` of N worker processes), a scheduler address
        (``"tcp://host:8786"``) or a ``distributed.Client``.
    retries
        Further tries of a slide whose failure may pass (worker died, I/O error, ...).
    report_path
        The run report (CSV); default ``<out_dir>/reports/embed-<UTC time>-<pid>.csv``.
    progress
        Called as ``progress(slide_id, done_tiles, total_tiles)`` while slides run.
    on_result
        Called with each slide's final :class:`SlideReport` (skipped ones first).
    on_slide_done
        Called with the feature file of each slide embedded or reused, in this process, in
        the order slides finish, never concurrently (e.g. to add it to a cohort index).
    on_plan
        Called with the :class:`CohortPlan` before any slide starts.
    on_dashboard
        Called with the dask dashboard link (None inline or without bokeh) once the
        cluster is up.
    table_flush_s
        Write finished rows into the cohort table at least this often (and at the end).
    index
        Keep the cohort's similarity index current as slides finish
        (:class:`~gpfm_core.cohort.index.IndexFeeder`: each feature file is added to the
        ``gpfm_index`` of its feature folder, in this process, one slide at a time; slides
        skipped as done are added at the end when the index lacks them; the old file of a
        slide superseded in the cohort table is removed from it as the table is written).
        A slide already indexed as it is costs one ``stat``: a rerun writes nothing. An
        index that cannot be updated is reported in :attr:`CohortRun.index_errors`; embedding goes on.

    Returns
    -------
    CohortRun

    Raises
    ------
    EncoderError, GpfmError
        Unknown encoder or unusable device, or settings no slide can use (``mpp`` <= 0,
        ``tile_px`` < 1, ``overlap_px`` not in [0, tile_px), ``min_tissue`` outside [0, 1],
        ``batch_size`` < 1): before any slide is read; nothing written.
    """
    t0 = time.perf_counter()
    settings = settings or EmbedSettings()
    entries = list(entries)
    if retries < 0:
        raise GpfmError(f"retries must be >= 0, not {retries}")
    settings.check()  # settings of every slide: one error before the encoder loads
    enc, meta, weights_hash = _encoder_for_plan(settings, encoder, inline=executor == "inline")
    settings.check(meta)  # overlap against the encoder's tile size
    # absolute: workers elsewhere (another node, another cwd) write to the same place
    folder = Path(os.path.abspath(out_dir))
    plan = plan_cohort(entries, folder, meta=meta, weights_hash=weights_hash, settings=settings)
    entries = plan.entries
    if on_plan is not None:
        on_plan(plan)
    feeder = None
    slide_done = on_slide_done
    if index:
        from gpfm_core.cohort.index import IndexFeeder

        feeder = IndexFeeder()

        def slide_done(path: Path) -> None:
            assert feeder is not None
            feeder(path)
            if on_slide_done is not None:
                on_slide_done(path)

    collector = _Collector(
        folder,
        flush_s=table_flush_s,
        on_result=on_result,
        on_slide_done=slide_done,
        # a superseded slide's old file is deleted with its row: its index entry goes too
        on_removed=feeder.remove if feeder is not None else None,
    )
    for report in plan.settled:
        collector.settle(report)
    executor_name = executor if isinstance(executor, str) else "client"
    dashboard: str | None = None
    table: Path | None = None
    try:
        if plan.todo and executor == "inline":
            _run_inline(plan, settings, folder, enc, retries, progress, collector)
        elif plan.todo:
            from gpfm_core.cohort.distributed import run_on_dask

            executor_name, dashboard = run_on_dask(
                executor,
                plan,
                settings,
                folder,
                retries=retries,
                progress=progress,
                settle=collector.settle,
                on_dashboard=on_dashboard,
            )
    finally:
        # an interrupted run still leaves its report and the rows it finished
        for entry in entries:
            if entry.slide_id not in collector.final:
                collector.final[entry.slide_id] = SlideReport(
                    entry.slide_id, str(entry.path), "cancelled", error="the run was interrupted"
                )
        table = collector.flush()
        reports = [collector.final[e.slide_id] for e in entries]
        written = write_report(reports, _report_path(folder, report_path)) if entries else None
    if table is None and table_path(folder).is_file():
        table = table_path(folder)
    if feeder is not None:
        # slides done by an earlier run (or a run without the index): added when missing,
        # in one pass per index (a stat each, nothing written when all are there)
        feeder.add(r.file for r in plan.settled if r.status == "skipped" and r.file)
    return CohortRun(
        reports,
        written,
        table,
        executor_name,
        dashboard,
        time.perf_counter() - t0,
        str(meta.name),
        weights_hash,
        indexes=dict(feeder.updates) if feeder is not None else {},
        index_errors=dict(feeder.errors) if feeder is not None else {},
    )


def _run_inline(
    plan: CohortPlan,
    settings: EmbedSettings,
    folder: Path,
    enc: Any,
    retries: int,
    progress: Callable[[str, int, int], None] | None,
    collector: _Collector,
) -> None:
    """One slide after another in this process, with the encoder built once."""
    for entry in plan.todo:
        attempts = 0
        while True:
            attempts += 1
            report = embed_cohort_slide(
                entry,
                settings,
                str(folder),
                plan.settings[entry.path],
                encoder=enc,
                progress=progress,
            )
            report.attempts = attempts
            report.worker = "inline"
            if report.ok or not report.retryable or attempts > retries:
                break
            log.info("%s: try %d failed (%s); trying again", entry.path, attempts, report.error)
        collector.settle(report)


def _report_path(folder: Path, given: PathLike | None) -> Path:
    if given is not None:
        return Path(given)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return folder / REPORT_DIR / f"embed-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.csv"


def write_report(reports: Sequence[SlideReport], path: PathLike) -> Path:
    """Write the run report (CSV, one row per slide; see :meth:`SlideReport.csv_row`) atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in reports:
        writer.writerow(r.csv_row())
    return write_atomic(path, buf.getvalue(), parents=True)


def read_report(path: PathLike) -> list[dict[str, str]]:
    """The rows of a run report (strings), e.g. to list the failed slides of a run."""
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(open(path, newline="", encoding="utf-8"))
        return list(csv.DictReader(fh))
