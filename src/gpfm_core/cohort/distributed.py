"""The dask.distributed side of a cohort run: clusters, GPU resources, tasks, progress events.

Executors (``executor`` of :func:`gpfm_core.cohort.run_cohort`, ``gpfm embed --cluster`` /
``--scheduler``):

- ``"local"`` / ``"local:N"``: a ``dask.distributed.LocalCluster`` of N worker processes,
  one thread each (one slide at a time per worker; torch gets ``cores // N`` threads in each).
  N defaults to the number of CUDA devices when embedding on CUDA, else ``cores // 2``
  (at least 2). On a CUDA machine each worker advertises ``GPU=1`` and takes device
  ``cuda:<worker index>``.
- a scheduler address (``"tcp://host:8786"``): any running dask cluster (dask-jobqueue on
  SLURM, Kubernetes, workers started by hand on a multi-GPU box). When its workers advertise
  a ``GPU`` resource (``dask worker ADDRESS --nthreads 1 --resources GPU=1`` with
  ``CUDA_VISIBLE_DEVICES`` set per worker), every slide asks for ``GPU=1``: one slide at a
  time per GPU, and only GPU workers take slides.
- a ``distributed.Client`` made by the caller (tests, notebooks).

One task per slide: its arguments are the slide's path and the run's settings, its result a
small report; tiles are read, embedded and written by the worker that owns the slide and
never pass through the scheduler. Progress goes from workers to the client as scheduler
events (``Worker.log_event`` / ``Client.subscribe_topic``), a few small messages a second.
The scheduler reschedules the task of a worker that died; a slide that still fails is tried
again by :mod:`gpfm_core.cohort.run` up to ``retries`` times, then listed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    from gpfm_core.cohort.run import CohortPlan, EmbedSettings, SlideReport

log = logging.getLogger(__name__)

__all__ = [
    "ProgressPublisher",
    "default_local_workers",
    "gpu_resources",
    "open_client",
    "parse_local",
    "run_on_dask",
    "worker_device",
    "worker_name",
]

#: Seconds between two progress events of one slide (the last one is always sent).
PROGRESS_INTERVAL_S = 0.5


def _current_worker() -> Any:
    """The dask worker running this code, or None (never imports distributed itself)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def worker_name() -> str:
    """The address of the dask worker running this code, or ``"inline"``."""
    w = _current_worker()
    return "inline" if w is None else str(w.address)


def worker_device(device: str) -> str:
    """The device a slide task uses: ``cuda:<worker index>`` on a multi-GPU LocalCluster.

    A worker started with ``CUDA_VISIBLE_DEVICES`` (the documented way) sees one GPU and
    keeps ``device``; a ``LocalCluster`` worker (named 0, 1, ... by dask) on a machine with
    several visible GPUs takes GPU ``index % count``.
    """
    w = _current_worker()
    if w is None or device not in ("auto", "cuda") or os.environ.get("CUDA_VISIBLE_DEVICES"):
        return device
    if not isinstance(w.name, int):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{w.name % count}" if count > 1 else device


class ProgressPublisher:
    """Sends ``{slide, done, total, pid, worker}`` to a topic from a worker, throttled."""

    def __init__(self, topic: str, slide_id: str) -> None:
        self.topic = topic
        self.slide_id = slide_id
        self.worker = _current_worker()
        self.last = 0.0
        self.sent: tuple[int, int] | None = None

    def __call__(self, done: int, total: int, *, final: bool = False) -> None:
        if self.worker is None:
            return
        now = time.monotonic()
        if final and self.sent == (done, total):
            return
        if not final and now - self.last < PROGRESS_INTERVAL_S and done < total:
            return
        self.last = now
        self.sent = (int(done), int(total))
        self.worker.log_event(
            self.topic,
            {
                "slide": self.slide_id,
                "done": int(done),
                "total": int(total),
                "pid": os.getpid(),
                "worker": str(self.worker.address),
            },
        )


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cuda_count(device: str) -> int:
    if device == "cpu" or device.startswith("mps"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_local_workers(device: str) -> int:
    """Workers of ``--cluster local``: one per CUDA device, else ``cores // 2`` (at least 2)."""
    gpus = _cuda_count(device)
    return gpus if gpus else max(2, _cpu_count() // 2)


def parse_local(spec: str) -> int | None:
    """``"local"`` -> None (the default count), ``"local:N"`` -> N; else :class:`GpfmError`."""
    name, _, count = spec.partition(":")
    if name != "local":
        raise GpfmError(f"--cluster takes local or local:N, not {spec!r}")
    if not count:
        return None
    try:
        n = int(count)
    except ValueError:
        n = 0
    if n < 1:
        raise GpfmError(f"--cluster {spec}: N must be a whole number >= 1 (e.g. local:4)")
    return n


@contextlib.contextmanager
def open_client(executor: Any, settings: EmbedSettings) -> Iterator[tuple[Any, str, EmbedSettings]]:
    """A ``distributed.Client`` for ``executor`` (see the module docstring), closed after.

    Yields
    ------
    tuple
        ``(client, name, settings)``: ``settings`` with ``torch_threads`` set for a local
        cluster.

    Raises
    ------
    GpfmError
        A bad ``local:N``, or no scheduler answers at the address.
    """
    from distributed import Client, LocalCluster

    if not logging.getLogger("gpfm_core").isEnabledFor(logging.INFO):
        # distributed logs every start, connection and close at INFO into this process's
        # stderr (its scheduler and nannies live here); keep its warnings unless -v
        logging.getLogger("distributed").setLevel(logging.ERROR)
    if not isinstance(executor, str):  # the caller's client: leave it open
        yield executor, str(getattr(executor.scheduler, "address", "client")), settings
        return
    if executor.startswith("local"):
        n = parse_local(executor) or default_local_workers(settings.device)
        gpus = _cuda_count(settings.device)
        kwargs: dict[str, Any] = {"resources": {"GPU": 1}} if gpus else {}
        threads = settings.torch_threads or max(1, _cpu_count() // n)
        with (
            LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                silence_logs=logging.ERROR,
                **kwargs,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client, f"local:{n}", replace(settings, torch_threads=threads)
        return
    try:
        client = Client(executor, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise GpfmError(
            f"no dask scheduler answers at {executor} ({type(exc).__name__}); start one "
            "(dask scheduler) or check the address"
        ) from None
    with client:
        yield client, executor, settings


def gpu_resources(client: Any) -> dict[str, float] | None:
    """``{"GPU": 1}`` when any worker of the cluster advertises a GPU resource, else None."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    has_gpu = any("GPU" in (w.get("resources") or {}) for w in workers.values())
    return {"GPU": 1} if has_gpu else None


def _warm_worker(settings: EmbedSettings) -> str:
    """Import torch and build the encoder on a worker (in its task thread, where slides run)."""
    from gpfm_core.cohort.run import _task_encoder

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    _task_encoder(settings, worker_device(settings.device))
    return worker_name()


def _warm_workers(client: Any, settings: EmbedSettings, resources: dict[str, float] | None) -> None:
    """Build the encoder on every worker there now, in parallel, before the first slide.

    Start-up costs (importing torch, reading weights) then stay out of the slides' timings,
    and an encoder a worker cannot build (missing weights file, no CUDA there) is one clear
    error before any slide, not one failure per slide. Workers that join later build it with
    their first slide.

    Raises
    ------
    GpfmError
        A worker could not build the encoder.
    """
    from distributed import wait

    from gpfm_core.cohort.run import _one_line

    info = client.scheduler_info(n_workers=-1).get("workers", {})
    # a worker without the resource a slide asks for would never run its warm-up task
    workers = [a for a, w in info.items() if not resources or "GPU" in (w.get("resources") or {})]
    futs = [
        client.submit(
            _warm_worker,
            settings,
            key=f"gpfm-warm-{uuid.uuid4().hex[:8]}",
            workers=[w],
            allow_other_workers=False,
            pure=False,
            resources=resources,
        )
        for w in workers
    ]
    wait(futs)
    for w, fut in zip(workers, futs, strict=True):
        if fut.status == "error":
            exc = fut.exception()
            raise GpfmError(f"dask worker {w} cannot build the encoder: {_one_line(exc)}") from None
        fut.release()


def _dashboard(client: Any) -> str | None:
    try:
        link = client.dashboard_link
    except Exception:  # no bokeh, or the scheduler runs no dashboard
        return None
    return str(link) if link else None


def run_on_dask(
    executor: Any,
    plan: CohortPlan,
    settings: EmbedSettings,
    folder: Path,
    *,
    retries: int,
    progress: Callable[[str, int, int], None] | None,
    settle: Callable[[SlideReport], None],
    on_dashboard: Callable[[str | None], None] | None = None,
) -> tuple[str, str | None]:
    """Run ``plan.todo`` on a dask cluster, one task per slide; returns (executor, dashboard).

    Each finished slide goes to ``settle`` (in this thread, in the order slides finish). A
    slide whose task failed in a way that may pass (its worker died, an I/O error) is
    submitted again, up to ``retries`` more times.
    """
    from distributed import as_completed

    from gpfm_core.cohort.run import SlideReport, _one_line, embed_cohort_slide

    run_id = uuid.uuid4().hex[:8]
    topic = f"gpfm-cohort-{run_id}"
    with open_client(executor, settings) as (client, name, task_settings):
        dashboard = _dashboard(client)
        log.info("dask cluster %s, dashboard %s", name, dashboard)
        if on_dashboard is not None:
            on_dashboard(dashboard)
        if progress is not None:
            client.subscribe_topic(
                topic, lambda ev: progress(ev[1]["slide"], ev[1]["done"], ev[1]["total"])
            )
        resources = gpu_resources(client)
        _warm_workers(client, task_settings, resources)
        running: dict[Any, tuple[int, int]] = {}
        done = as_completed()

        def submit(i: int, attempt: int) -> None:
            entry = plan.todo[i]
            fut = client.submit(
                embed_cohort_slide,
                entry,
                task_settings,
                str(folder),
                plan.settings[entry.path],
                topic=topic,
                submitted=time.time(),
                key=f"gpfm-embed-{i}-{attempt}-{run_id}",
                pure=False,
                resources=resources,
            )
            running[fut] = (i, attempt)
            done.add(fut)

        try:
            for i in range(len(plan.todo)):
                submit(i, 1)
            for fut in done:
                i, attempt = running.pop(fut)
                entry = plan.todo[i]
                try:
                    report = fut.result()
                except Exception as exc:  # the task never returned: its worker died ...
                    report = SlideReport(
                        entry.slide_id,
                        str(entry.path),
                        "failed",
                        error=f"{type(exc).__name__}: {_one_line(exc)}",
                        retryable=True,
                    )
                fut.release()
                report.attempts = attempt
                if not report.ok and report.retryable and attempt <= retries:
                    log.info("%s: try %d failed (%s); again", entry.path, attempt, report.error)
                    submit(i, attempt + 1)
                    continue
                settle(report)
        finally:
            if running:
                client.cancel(list(running))
            if progress is not None:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(topic)
    return name, dashboard
