"""Exception types raised at gpfm_core's public boundaries.

Every error a user can cause (a wrong path, a slide without µm/px, an unknown encoder)
is a :class:`GpfmError` whose message is one line that says what to do. The CLI prints
that line and exits non-zero; the napari plugin shows it as a notification.
"""

from __future__ import annotations


class GpfmError(ValueError):
    """Base class for user-facing errors; the message is one line that names the fix."""


class SlideError(GpfmError):
    """A slide cannot be opened or read (missing, unsupported, corrupt, no µm/px ...)."""


class EncoderError(GpfmError):
    """An encoder cannot be built or its weights do not fit."""


class ConfigError(GpfmError):
    """A configuration file or value is invalid (unknown keys, wrong types)."""
