"""Where feature and tile files live, which file is a slide's, and the lock per file.

The layout follows TRIDENT's (``trident/Processor.py``: ``run_patching_job`` saves coordinates
under ``<job_dir>/<mag>x_<patch>px_<overlap>px_overlap/patches/<slide>_patches.h5`` and
``run_patch_feature_extraction_job`` saves features under
``<job_dir>/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``), keyed by
µm/px instead of a rounded magnification and by the encoder's weights hash as well::

    <out>/<mpp>mpp_<tile_px>px_<overlap>px_overlap/features_<encoder>-<hash8>/<slide>.h5
    <out>/<mpp>mpp_<tile_px>px_<overlap>px_overlap/patches/<slide>_patches.h5   (gpfm tiles)

Everything that makes two files differ is in the path: the tiling in the first folder, the
encoder and its weights in the second, the slide in the name. ``<slide>`` is the slide's file
stem, as TRIDENT and CLAM name their files. When that name already holds *another* slide (two
``S01.svs`` from different folders), the second gets ``<stem>-<slide_id[:8]>``: stable (from
the slide's content hash, not from the order of runs) and found again by
:func:`find_embeddings`. Settings the path does not hold (tissue detector and its
parameters, ``min_tissue``, a user mask, a µm/px override, the stored dtype) are checked
against the file's attributes: a file made otherwise is never reused, and never replaced
without ``force`` (:class:`EmbeddingsClashError` names both paths).

:func:`slide_lock` (the ``filelock`` library, an OS-level lock released when its process
dies) keeps two processes, threads or cluster workers from writing one file: the second
waits, then finds the finished file and reuses it. The lock files live in a hidden ``.locks``
folder, so the features folder lists only ``.h5`` files, and TRIDENT (which reads a
``<name>.lock`` beside a file as "busy") never sees them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gpfm_core.embed._errors import EmbedCancelled, EmbeddingsClashError
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "FEATURES_SUFFIX",
    "LOCK_DIR",
    "PATCHES_SUFFIX",
    "EmbeddingsLockTimeout",
    "claim_slide_file",
    "coords_dir",
    "embeddings_path",
    "features_dir",
    "find_embeddings",
    "lock_path",
    "settings_diff",
    "slide_file_names",
    "slide_lock",
    "stale_temps",
    "tiling_dirname",
]

#: File name endings: features ``<slide>.h5``, tile lists ``<slide>_patches.h5`` (TRIDENT's).
FEATURES_SUFFIX = ".h5"
PATCHES_SUFFIX = "_patches.h5"
_ID_CHARS = 8


class EmbeddingsLockTimeout(GpfmError):
    """Another process held a slide's lock for longer than the caller would wait."""


def _num(value: float) -> str:
    return f"{float(value):.6g}"


def _safe(name: str) -> str:
    # encoder names may be paths or "timm:vit_small..."; keep one portable folder name
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(name)).strip("-.") or "encoder"


def tiling_dirname(*, mpp: float, tile_px: int, overlap_px: int = 0) -> str:
    """Folder name of a tiling: ``"0.5mpp_224px_0px_overlap"`` (TRIDENT's, in µm/px)."""
    return f"{_num(mpp)}mpp_{int(tile_px)}px_{int(overlap_px)}px_overlap"


def encoder_dirname(encoder: str, weights_hash: str | None) -> str:
    """Folder name of an encoder: ``"features_<encoder>-<8 characters of its weights hash>"``.

    Encoders without weights (``weights_hash`` None, ``""`` or ``"none"``) get
    ``"features_<encoder>"``, TRIDENT's name.
    """
    name = f"features_{_safe(encoder)}"
    if not weights_hash or weights_hash == "none":
        return name
    return f"{name}-{short_hash(weights_hash)}"


def short_hash(weights_hash: str) -> str:
    """8 characters naming a weights hash: its first 8 when hex (a file's SHA-256), else a
    digest of the string (``"random-init-seed0"`` and ``"random-init-seed1"`` differ)."""
    text = str(weights_hash)
    if re.fullmatch(r"[0-9a-fA-F]{8,}", text):
        return text[:_ID_CHARS].lower()
    return hashlib.sha256(text.encode()).hexdigest()[:_ID_CHARS]


def features_dir(
    out_dir: PathLike,
    *,
    encoder: str,
    weights_hash: str | None,
    mpp: float,
    tile_px: int,
    overlap_px: int = 0,
) -> Path:
    """The folder of one encoder's features at one tiling.

    Returns
    -------
    Path
        ``<out_dir>/<mpp>mpp_<tile_px>px_<overlap>px_overlap/features_<encoder>-<hash8>``.
    """
    tiling = tiling_dirname(mpp=mpp, tile_px=tile_px, overlap_px=overlap_px)
    return Path(out_dir) / tiling / encoder_dirname(encoder, weights_hash)


def coords_dir(out_dir: PathLike, *, mpp: float, tile_px: int, overlap_px: int = 0) -> Path:
    """The folder of tile lists at one tiling: ``<out_dir>/<tiling>/patches`` (TRIDENT's)."""
    return (
        Path(out_dir) / tiling_dirname(mpp=mpp, tile_px=tile_px, overlap_px=overlap_px) / "patches"
    )


def slide_file_names(
    slide_path: PathLike, slide_id: str, *, suffix: str = FEATURES_SUFFIX
) -> tuple[str, str]:
    """The two names a slide's file may have: ``<stem><suffix>`` and ``<stem>-<id8><suffix>``.

    The stem drops the last suffix only (``CMU-1.svs`` -> ``CMU-1``), as TRIDENT and CLAM do;
    a DICOM series is named after its folder, whichever file of it was given
    (:func:`gpfm_core.slide.slide_stem`). The second name is used only when the first holds
    another slide.
    """
    from gpfm_core.slide._formats import slide_stem

    stem = slide_stem(slide_path)
    return f"{stem}{suffix}", f"{stem}-{str(slide_id)[:_ID_CHARS]}{suffix}"


#: Hidden folder beside the files that holds their lock files (left in place: deleting a lock
#: file while another process may open it would let two writers hold "the" lock).
LOCK_DIR = ".locks"


def lock_path(path: PathLike) -> Path:
    """The lock file of ``path``: ``<folder>/.locks/<name>.lock``."""
    p = Path(path)
    return p.parent / LOCK_DIR / f"{p.name}.lock"


def stale_temps(path: PathLike) -> list[Path]:
    """Temporary files of :func:`gpfm_core._atomic.atomic_path` left beside ``path``.

    ``atomic_path`` names them ``.<name>.<random>.tmp``. Only call this while holding
    :func:`slide_lock` on ``path``: then no live writer owns one, and they are leftovers of a
    killed run.
    """
    p = Path(path)
    if not p.parent.is_dir():
        return []
    return sorted(p.parent.glob(f".{glob_escape(p.name)}.*.tmp"))


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def remove_stale_temps(path: PathLike) -> int:
    """Delete :func:`stale_temps` of ``path`` (caller holds its lock); returns how many."""
    n = 0
    for tmp in stale_temps(path):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
            log.info("removed %s, left by a killed run", tmp)
    return n


@contextlib.contextmanager
def slide_lock(
    path: PathLike,
    *,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    poll_s: float = 0.2,
) -> Iterator[Path]:
    """Hold the lock of one output file while the block runs.

    An OS-level lock (``filelock.FileLock``: ``flock`` on POSIX) on :func:`lock_path`:
    exclusive between processes, threads and cluster workers sharing the folder, and
    released by the OS when the holder dies, so a killed run never blocks the next.
    (On network file systems without ``flock`` support, put ``out`` on a local or
    lock-capable file system.)

    Parameters
    ----------
    path
        The file to be written (its folder must exist).
    timeout
        Seconds to wait; None waits as long as the holder works.
    cancel
        When set while waiting, :class:`EmbedCancelled` is raised.
    poll_s
        How often ``cancel`` and ``timeout`` are looked at while waiting.

    Yields
    ------
    Path
        ``path``, locked.

    Raises
    ------
    EmbeddingsLockTimeout
        ``timeout`` passed while another process held the lock.
    EmbedCancelled
        ``cancel`` was set while waiting.
    """
    from filelock import FileLock, Timeout

    p = Path(path)
    lp = lock_path(p)
    lp.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lp))
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s: another process is writing %s", lock.lock_file, p.name)
        while True:
            if cancel is not None and cancel.is_set():
                raise EmbedCancelled(f"cancelled while waiting for {p}") from None
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise EmbeddingsLockTimeout(
                    f"{p} is being written by another process (lock {lock.lock_file}) for "
                    f"more than {timeout:g} s; wait for it or raise the timeout"
                ) from None
            try:
                lock.acquire(timeout=min(poll_s, left))
                break
            except Timeout:
                continue
    try:
        yield p
    finally:
        lock.release()


def file_slide_id(path: PathLike) -> str | None:
    """The ``slide_id`` root attribute of an existing HDF5 file; None when absent/unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("slide_id")
    except (OSError, KeyError):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _choose(
    folder: Path, slide_path: PathLike, slide_id: str, suffix: str, unique_name: bool = False
) -> Path:
    """Which of the two names is (or becomes) this slide's file; see :func:`slide_file_names`."""
    base_name, alt_name = slide_file_names(slide_path, slide_id, suffix=suffix)
    base, alt = folder / base_name, folder / alt_name
    if alt.exists() and file_slide_id(alt) == slide_id:
        return alt
    if unique_name and not alt.exists():
        return alt
    if not unique_name and (not base.exists() or file_slide_id(base) == slide_id):
        return base
    if not alt.exists():
        return alt
    raise EmbeddingsClashError(
        f"cannot write {slide_path}: {base} and {alt} both hold other slides; move one of "
        "them away or choose another output folder"
    )


def existing_slide_file(
    folder: PathLike, slide_path: PathLike, slide_id: str, *, suffix: str = FEATURES_SUFFIX
) -> Path | None:
    """This slide's file in ``folder`` when there is one (either name), else None."""
    folder = Path(folder)
    for name in slide_file_names(slide_path, slide_id, suffix=suffix):
        p = folder / name
        if p.is_file() and file_slide_id(p) == slide_id:
            return p
    return None


@contextlib.contextmanager
def claim_slide_file(
    folder: PathLike,
    slide_path: PathLike,
    slide_id: str,
    *,
    suffix: str = FEATURES_SUFFIX,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    unique_name: bool = False,
) -> Iterator[Path]:
    """Lock and return the file of ``slide_path`` in ``folder`` (created) for the block.

    ``unique_name`` sends the slide to ``<stem>-<id8><suffix>`` whatever ``<stem><suffix>``
    holds: a cohort decides from its inputs' order which of its same-stem slides this is
    (:attr:`gpfm_core.cohort.CohortEntry.unique_name`), so the names do not depend on which
    slide is written first.

    The name is decided under the lock of ``<stem><suffix>`` (so two slides with one stem
    never both take it); a slide sent to ``<stem>-<id8><suffix>`` takes that name's lock
    before it lets go of the first (always in this order: no deadlock). Temporary files a killed writer left beside the
    chosen name are removed. The caller then reads or replaces the file; nobody else writes it
    until the block ends.

    Raises
    ------
    EmbeddingsClashError
        Both names hold other slides.
    EmbeddingsLockTimeout, EmbedCancelled
        As :func:`slide_lock`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / slide_file_names(slide_path, slide_id, suffix=suffix)[0]
    with contextlib.ExitStack() as stack:
        base_lock = contextlib.ExitStack()
        stack.callback(base_lock.close)
        base_lock.enter_context(slide_lock(base, timeout=timeout, cancel=cancel))
        target = _choose(folder, slide_path, slide_id, suffix, unique_name)
        if target != base:
            stack.enter_context(slide_lock(target, timeout=timeout, cancel=cancel))
            base_lock.close()  # the name is decided: other slides of this stem may go on
        remove_stale_temps(target)
        yield target


def settings_diff(attrs: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The settings in which a stored file differs from ``wanted``, one phrase each.

    ``None`` in ``wanted`` means "any". Floats compare with a relative tolerance of 1e-6.

    Returns
    -------
    list of str
        e.g. ``["min_tissue 0.5 in the file, 0.25 here"]``; empty when all agree.
    """
    from gpfm_core.embed.loading import same_value

    out = []
    for key, want in wanted.items():
        if want is None:
            continue
        have = attrs.get(key)
        if have is None:
            out.append(f"no {key} recorded in the file (made by an older or another tool)")
        elif not same_value(have, want):
            sub = _json_diff(have, want)
            if sub:
                out.extend(
                    f"{key}.{k} {_short(a)} in the file, {_short(b)} here" for k, a, b in sub
                )
            else:
                out.append(f"{key} {_short(have)} in the file, {_short(want)} here")
    return out


def _json_diff(have: Any, want: Any) -> list[tuple[str, Any, Any]]:
    """The differing keys of two JSON-object strings (e.g. ``tissue_params``); [] otherwise."""
    try:
        a, b = json.loads(have), json.loads(want)
    except (TypeError, ValueError):
        return []
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return []
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def embeddings_path(
    slide_path: PathLike,
    out_dir: PathLike,
    *,
    slide_id: str,
    encoder: str,
    weights_hash: str | None,
    mpp: float,
    tile_px: int,
    overlap_px: int = 0,
) -> Path:
    """The feature file of a slide: where it is, or where :func:`~gpfm_core.embed.embed_slide`
    would write it now.

    A look at the folder without the lock: a concurrent writer may still take the name first
    (the embedding itself decides under :func:`claim_slide_file`).

    Parameters
    ----------
    slide_path
        The slide (only its stem is used).
    out_dir
        The output root (``--out``).
    slide_id
        The slide's content id (``Slide.info.slide_id``).
    encoder, weights_hash
        Encoder name (``EncoderMeta.name``) and ``encoder.weights_hash``.
    mpp, tile_px, overlap_px
        The tiling: requested µm/px, tile side in px, overlap in px at that µm/px.

    Raises
    ------
    EmbeddingsClashError
        Both possible names hold other slides.
    """
    folder = features_dir(
        out_dir,
        encoder=encoder,
        weights_hash=weights_hash,
        mpp=mpp,
        tile_px=tile_px,
        overlap_px=overlap_px,
    )
    return _choose(folder, slide_path, slide_id, FEATURES_SUFFIX)


def find_embeddings(
    slide_path: PathLike,
    out_dir: PathLike,
    *,
    encoder: str,
    weights_hash: str | None,
    mpp: float,
    tile_px: int,
    overlap_px: int = 0,
    slide_id: str | None = None,
    **settings: Any,
) -> Path | None:
    """The existing, complete feature file of a slide made with these settings, else None.

    Parameters
    ----------
    slide_path, out_dir, encoder, weights_hash, mpp, tile_px, overlap_px
        As :func:`embeddings_path`.
    slide_id
        The slide's content id; computed by opening the slide when None.
    **settings
        Further root attributes the file must agree with, e.g. ``min_tissue=0.25``,
        ``tissue_detector=DETECTOR_VERSION``; None values are ignored.

    Returns
    -------
    Path or None
        The file when it exists, belongs to this slide and matches; else None.
    """
    from gpfm_core.embed.loading import EmbeddingsFileError, read_attrs

    if slide_id is None:
        from gpfm_core.slide import open_slide

        with open_slide(slide_path) as slide:
            slide_id = slide.info.slide_id
    folder = features_dir(
        out_dir,
        encoder=encoder,
        weights_hash=weights_hash,
        mpp=mpp,
        tile_px=tile_px,
        overlap_px=overlap_px,
    )
    path = existing_slide_file(folder, slide_path, slide_id)
    if path is None:
        return None
    try:
        attrs = read_attrs(path)
    except EmbeddingsFileError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    wanted = {
        "encoder": encoder,
        "weights_hash": weights_hash,
        "requested_mpp": float(mpp),
        "tile_px": int(tile_px),
        "overlap_px": int(overlap_px),
        **settings,
    }
    return None if settings_diff(attrs, wanted) else path
