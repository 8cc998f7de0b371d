"""Errors of the embedding engine that several of its modules raise."""

from __future__ import annotations

from gpfm_core.errors import GpfmError


class EmbedCancelled(GpfmError):
    """The run was cancelled through its ``cancel`` event; no file was written."""


class EmbeddingsClashError(GpfmError):
    """An output file holds something this run must not silently reuse or replace.

    The message names the slide (or the other slide) and the file, and the way out:
    ``--force`` / ``force=True`` to replace it, or another output folder.
    """
