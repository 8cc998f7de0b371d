"""Embed many slides with one encoder; a failing slide is reported and the rest continue."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpfm_core.embed.device import resolve_device, resolve_precision
from gpfm_core.embed.pipeline import (
    EmbedCancelled,
    EmbedResult,
    PathLike,
    iter_embed_slide,
    resolve_encoder,
)
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideOutcome:
    """One slide of :func:`embed_slides`: its ``result``, or the one-line ``error``."""

    slide: Path
    result: EmbedResult | None
    error: str | None

    @property
    def ok(self) -> bool:
        """True when the slide has an embeddings file."""
        return self.error is None


def embed_slides(
    slide_paths: Iterable[PathLike],
    *,
    encoder: Any = "default",
    out_dir: PathLike,
    device: str = "auto",
    precision: str = "auto",
    progress: Callable[[Path, int, int], None] | None = None,
    on_result: Callable[[SlideOutcome], None] | None = None,
    **kwargs: Any,
) -> list[SlideOutcome]:
    """Embed each slide into its feature file under ``out_dir`` with one encoder.

    Files follow :mod:`gpfm_core.embed.layout`: two slides with one stem get two files, and a
    slide embedded by another process at the same time is waited for and reused.

    The encoder and device are resolved once, before any slide: an unknown encoder or a
    missing GPU raises at once. After that, a slide that fails (unreadable file, no µm/px,
    disk full ...) is logged and recorded, and the next slide starts.

    Parameters
    ----------
    slide_paths
        Slides to embed, in order.
    encoder, out_dir, device, precision, **kwargs
        As :func:`~gpfm_core.embed.iter_embed_slide`.
    progress
        Called as ``progress(slide, done, total)`` after each batch.
    on_result
        Called with each :class:`SlideOutcome` as soon as its slide is finished.

    Returns
    -------
    list of SlideOutcome
        One per slide, in order; ``all(o.ok for o in outcomes)`` when every slide worked.

    Raises
    ------
    EncoderError, GpfmError
        Unknown encoder or unusable device (before any slide is read).
    EmbedCancelled
        The ``cancel`` event was set; the slides after it are not started.
    """
    dev = resolve_device(device)
    resolve_precision(precision, dev)
    enc = resolve_encoder(encoder, dev)
    outcomes: list[SlideOutcome] = []
    for raw in slide_paths:
        slide = Path(raw)
        gen = iter_embed_slide(
            slide, encoder=enc, out_dir=out_dir, device=str(dev), precision=precision, **kwargs
        )
        try:
            while True:
                try:
                    ev = next(gen)
                except StopIteration as stop:
                    outcome = SlideOutcome(slide, stop.value, None)
                    break
                if progress is not None:
                    progress(slide, ev.done, ev.total)
        except EmbedCancelled:
            raise
        except (GpfmError, OSError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # a user error: the outcome carries it and the caller reports it in one line
            log.info("%s: %s", slide, msg)
            outcome = SlideOutcome(slide, None, msg)
        except Exception as exc:  # one broken slide must not end a cohort run
            log.error(
                "%s: unexpected %s: %s",
                slide,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(10),
            )
            outcome = SlideOutcome(slide, None, f"{type(exc).__name__}: {exc}")
        outcomes.append(outcome)
        if on_result is not None:
            on_result(outcome)
    return outcomes
