"""One way to write a file: a temporary file beside it, then an atomic rename.

Every file the project writes (features, tile lists, probes, GeoJSON, CSV, checkpoints,
exported encoders, synthetic slides) goes through :func:`atomic_path` or
:func:`write_atomic`, so a crash, a full disk or Ctrl-C never leaves a half-written file
under the final name, and the previous file stays intact until the new one is complete.

The temporary name is unpredictable (:func:`tempfile.mkstemp`: ``O_CREAT | O_EXCL``, so a
symlink planted in the folder is never followed) and lives in the target folder, so the
final :func:`os.replace` is a rename on one file system. ``os.replace`` replaces a symlink
at the destination itself rather than writing through it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpfm_core.errors import GpfmError

__all__ = ["atomic_path", "write_atomic"]


def _umask_mode() -> int:
    # mkstemp creates 0600; finished files get the mode an ordinary open() would give
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, parents: bool = False, fsync: bool = True
) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` on success.

    The caller writes the whole file to the yielded path (by name: h5py, torch.save,
    safetensors, tifffile all take one). When the block ends normally the file is flushed
    to disk, given the usual umask mode and renamed over ``path``; when it raises, the
    temporary file is removed and ``path`` is untouched.

    Parameters
    ----------
    path
        Destination file.
    parents
        Create missing parent folders; otherwise a missing folder is a :class:`GpfmError`.
    fsync
        Flush the finished file to disk before the rename.

    Raises
    ------
    GpfmError
        The destination folder does not exist (and ``parents`` is false), or the temporary
        file was replaced by something other than a regular file while it was written.
    """
    dest = Path(path)
    if parents:
        dest.parent.mkdir(parents=True, exist_ok=True)
    elif not dest.parent.is_dir():
        raise GpfmError(f"folder {dest.parent} does not exist: create it or choose another path")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        st = os.lstat(tmp)
        if not stat.S_ISREG(st.st_mode):
            raise GpfmError(f"temporary file {tmp} was replaced while writing {dest}: not renamed")
        if fsync:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, dest)
    finally:
        # after a successful replace the name is gone; otherwise clean up
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(
    path: str | os.PathLike[str], data: bytes | str, *, parents: bool = False
) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path.

    Raises
    ------
    GpfmError
        The destination folder does not exist (and ``parents`` is false).
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    dest = Path(path)
    with atomic_path(dest, parents=parents, fsync=False) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    return dest
