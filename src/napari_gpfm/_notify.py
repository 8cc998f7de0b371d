"""One-line user notifications for the napari plugin.

Every problem a user can cause reaches them as ONE notification line (never a
traceback wall); the full detail goes to the log.
"""

from __future__ import annotations

import logging

__all__ = ["notify_error", "notify_info", "notify_warning", "one_line"]

log = logging.getLogger(__name__)

_MAX_CHARS = 300


def one_line(message: object) -> str:
    """Squash ``message`` to one line of at most 300 characters.

    Parameters
    ----------
    message
        Any object; an exception gives its ``str``.

    Returns
    -------
    str
        The first non-empty line, whitespace collapsed, cut at 300 characters.
    """
    text = str(message).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = " ".join(lines[0].split()) if lines else type(message).__name__
    return first if len(first) <= _MAX_CHARS else first[: _MAX_CHARS - 1] + "…"


def notify_error(message: object) -> str:
    """Show ``message`` as one napari error notification line and log it.

    Returns
    -------
    str
        The line that was shown.
    """
    from napari.utils.notifications import show_error

    line = one_line(message)
    log.error(line)
    show_error(line)
    return line


def notify_warning(message: object) -> str:
    """Show ``message`` as one napari warning notification line and log it."""
    from napari.utils.notifications import show_warning

    line = one_line(message)
    log.warning(line)
    show_warning(line)
    return line


def notify_info(message: object) -> str:
    """Show ``message`` as one napari info notification line and log it."""
    from napari.utils.notifications import show_info

    line = one_line(message)
    log.info(line)
    show_info(line)
    return line
