"""Run the dock's long jobs in napari ``thread_worker``s, or inline for tests and scripts.

A job is a generator function taking ``cancel=`` (a :class:`threading.Event`) that yields
:class:`Step` objects and returns its result. :class:`Job` runs it either

* threaded: a napari :class:`~napari.qt.threading.GeneratorWorker`; ``on_step`` /
  ``on_done`` run on the main thread through the worker's ``yielded`` / ``returned``
  signals (the only place layers change), a napari progress bar follows the steps;
* inline (``sync=True``): the same callbacks, called in the caller's thread.

Errors never escape as a traceback: a :class:`~gpfm_core.errors.GpfmError` becomes one
notification line; anything else is logged with its traceback and shown as one line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from napari.utils import progress
from napari.utils.notifications import show_error, show_info

from gpfm_core.errors import GpfmError
from napari_gpfm._triton_guard import avoid_triton_crash

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One progress report of a job.

    Attributes
    ----------
    done, total : int
        Work units finished and expected (total 0: indeterminate).
    desc : str
        Stage shown on the progress bar.
    payload : Any
        Data for ``on_step`` (e.g. an ``EmbedProgress``).
    """

    done: int = 0
    total: int = 0
    desc: str = ""
    payload: Any = None


JobFunc = Callable[..., Generator[Step, None, Any]]


def error_line(exc: BaseException) -> str:
    """One notification line for ``exc``."""
    if isinstance(exc, GpfmError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def notify_error(exc: BaseException, *, what: str = "") -> None:
    """Show ``exc`` as one error notification (traceback only in the log)."""
    if not isinstance(exc, GpfmError):
        log.error("%s failed", what or "job", exc_info=exc)
    prefix = f"{what}: " if what else ""
    show_error(prefix + error_line(exc))


class Job:
    """A cancellable job run in a napari worker or inline.

    Parameters
    ----------
    func
        Generator function ``func(*args, cancel=Event, **kwargs)`` yielding :class:`Step`.
    name
        Short name shown on the progress bar and in messages.
    on_step
        Main-thread callback for each :class:`Step`.
    on_done
        Main-thread callback with the generator's return value (not called on cancel/error).
    on_end
        Main-thread callback ``on_end(state)`` with state ``"done"``, ``"cancelled"`` or
        ``"error"``, always called last.
    progress_bar
        Show a napari progress bar while it runs. Off for jobs that end within a click's
        time (gallery thumbnails): napari's activity dock adds and lays out a bar widget per
        job, ~0.1-0.3 s of main-thread time each, more than the job itself.
    """

    def __init__(
        self,
        func: JobFunc,
        *,
        name: str,
        on_step: Callable[[Step], None] | None = None,
        on_done: Callable[[Any], None] | None = None,
        on_end: Callable[[str], None] | None = None,
        progress_bar: bool = True,
    ) -> None:
        self.func = func
        self.progress_bar = progress_bar
        self.name = name
        self.on_step = on_step
        self.on_done = on_done
        self.on_end = on_end
        self.cancel_event = threading.Event()
        self.worker: Any = None
        self.state = "idle"
        self._pbar: progress | None = None
        self._result: Any = None

    # ------------------------------------------------------------------ public
    @property
    def running(self) -> bool:
        """True between start and end."""
        return self.state == "running"

    def start(self, *args: Any, sync: bool = False, **kwargs: Any) -> Any:
        """Start the job; with ``sync=True`` run it to the end and return its result."""
        avoid_triton_crash()
        self.cancel_event = threading.Event()
        self.state = "running"
        self._result = None
        self._pbar = progress(total=0, desc=self.name) if self.progress_bar else None
        kwargs["cancel"] = self.cancel_event
        if sync:
            return self._run_inline(args, kwargs)
        from napari.qt.threading import create_worker

        worker = create_worker(self.func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        worker.yielded.connect(self._step)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._errored)
        worker.aborted.connect(lambda: self._end("cancelled"))
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()
        return None

    def cancel(self) -> None:
        """Ask the job to stop; state becomes ``"cancelled"`` when it has."""
        if not self.running:
            return
        self.cancel_event.set()  # the job stops at its next check (and cleans up itself)

    # ------------------------------------------------------------------ internals
    def _run_inline(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        gen = self.func(*args, **kwargs)
        try:
            while True:
                if self.cancel_event.is_set():
                    gen.close()
                    self._end("cancelled")
                    return None
                try:
                    step = next(gen)
                except StopIteration as stop:
                    self._returned(stop.value)
                    break
                self._step(step)
        except Exception as exc:  # user-facing: one line, never a traceback wall
            self._errored(exc)
            return None
        self._finished()
        return self._result

    def _step(self, step: Any) -> None:
        if not isinstance(step, Step):
            step = Step(payload=step)
        pbar = self._pbar
        if pbar is not None:
            if step.total and pbar.total != step.total:
                pbar.total = step.total
            if step.desc:
                pbar.set_description(f"{self.name}: {step.desc}")
            if step.done > pbar.n:
                pbar.update(step.done - pbar.n)
        if self.on_step is not None and not self.cancel_event.is_set():
            self.on_step(step)

    def _returned(self, value: Any) -> None:
        if self.cancel_event.is_set():
            self._end("cancelled")
            return
        self._result = value
        try:
            if self.on_done is not None:
                self.on_done(value)
        except Exception as exc:
            self._errored(exc)
            return
        self._end("done")

    def _errored(self, exc: BaseException) -> None:
        if self.cancel_event.is_set() and isinstance(exc, GpfmError):
            self._end("cancelled")  # e.g. EmbedCancelled raised after our cancel request
            return
        notify_error(exc, what=self.name)
        self._end("error")

    def _finished(self) -> None:
        if self.state == "running":  # the generator stopped without returned/aborted
            self._end("cancelled" if self.cancel_event.is_set() else "done")
        self.worker = None

    def _end(self, state: str) -> None:
        if self.state != "running":
            return
        self.state = state
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if state == "cancelled":
            show_info(f"{self.name} cancelled")
        if self.on_end is not None:
            self.on_end(state)
