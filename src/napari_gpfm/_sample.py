"""Sample data: OpenSlide's public CMU-1-Small-Region.svs (Aperio, H&E, CC0).

:func:`find_cmu_small_region` (no napari import) looks in ``$GPFM_DATA_DIR`` first, then
in the pooch cache, then downloads it; every copy is checked against its SHA-256. It
raises a one-line :class:`~gpfm_core.errors.GpfmError` that says how to provide the
file when that all fails (offline). :func:`cmu_small_region` is the npe2 sample-data
command: the same, as a lazy slide layer, with a notification instead of an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from gpfm_core.errors import GpfmError

__all__ = [
    "CMU_FILENAMES",
    "CMU_SHA256",
    "CMU_URL",
    "cmu_small_region",
    "find_cmu_small_region",
    "sha256_file",
]

log = logging.getLogger(__name__)

CMU_URL = "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/CMU-1-Small-Region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
#: File names looked for in ``$GPFM_DATA_DIR``.
CMU_FILENAMES = ("cmu_small_region.svs", "CMU-1-Small-Region.svs")
_CACHE_NAME = "CMU-1-Small-Region.svs"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_cmu_small_region(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Path of a verified copy of CMU-1-Small-Region.svs (2220×2967 px, 0.499 µm/px).

    Parameters
    ----------
    data_dir
        Folder searched first (default ``$GPFM_DATA_DIR``) for ``cmu_small_region.svs``
        or ``CMU-1-Small-Region.svs``.
    url
        Download URL (default ``$GPFM_SAMPLE_URL`` or OpenSlide's test-data server).
    cache_dir
        pooch cache folder (default ``pooch.os_cache("napari-gpfm")``).

    Returns
    -------
    pathlib.Path
        A file whose SHA-256 is :data:`CMU_SHA256`.

    Raises
    ------
    GpfmError
        Offline with no verified copy; the message says where to put the file.
    """
    raw_dir = data_dir if data_dir is not None else os.environ.get("GPFM_DATA_DIR")
    problems: list[str] = []
    if raw_dir:
        for name in CMU_FILENAMES:
            candidate = Path(raw_dir).expanduser() / name
            if not candidate.is_file():
                continue
            if sha256_file(candidate) == CMU_SHA256:
                return candidate
            problems.append(f"{candidate} has the wrong SHA-256 (corrupt or another file)")
            log.warning(problems[-1])
    url = url or os.environ.get("GPFM_SAMPLE_URL") or CMU_URL
    try:
        import pooch

        cache = Path(cache_dir) if cache_dir is not None else Path(pooch.os_cache("napari-gpfm"))
        fetched = pooch.retrieve(
            url,
            known_hash=f"sha256:{CMU_SHA256}",
            fname=_CACHE_NAME,
            path=cache,
            progressbar=False,
        )
        return Path(fetched)
    except Exception as exc:  # requests/OSError/ValueError (hash): all mean "not available"
        log.warning("downloading %s failed: %s", url, exc)
        problems.append(f"download from {url} failed ({type(exc).__name__})")
    raise GpfmError(
        "CMU-1-Small-Region.svs sample is not available: "
        + "; ".join(problems)
        + f"; set GPFM_DATA_DIR to a folder holding it (download: {CMU_URL})"
    )


def cmu_small_region() -> list[tuple[Any, dict[str, Any], str]]:
    """npe2 sample-data command: the CMU slide as a lazy multiscale layer.

    Returns
    -------
    list of LayerDataTuple
        One ``(levels, kwargs, "image")``; empty (with one error notification) when the
        sample cannot be found or downloaded.
    """
    from napari_gpfm._notify import notify_error
    from napari_gpfm._reader import read_slide

    try:
        path = find_cmu_small_region()
    except GpfmError as exc:
        notify_error(exc)
        return []
    return read_slide(path)
