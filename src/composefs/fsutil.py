"""Crash-safe file output: nothing half-written is ever visible under the final name."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable


def current_umask() -> int:
    """The process umask, read without changing it (Linux 4.7+), else by set-and-restore."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_special_target(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` must be written in place rather than replaced by a rename.

    That is anything that exists and is not a regular file (a pipe, a terminal, a device),
    and the ``/proc/PID/fd/N`` and ``/dev/fd/N`` links that sandboxed pipelines pass
    (renaming onto them would not reach the file descriptor they stand for).
    """
    p = os.path.abspath(path)
    if p.startswith(("/proc/", "/dev/")):
        return True
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(st.st_mode)


def write_atomic(
    path: str | os.PathLike[str], chunks: Iterable[bytes | bytearray | memoryview]
) -> None:
    """Write ``chunks`` to ``path``: a temporary file beside it, fsync, rename, fsync dir.

    A symlink at ``path`` is followed (its target gets replaced), as an ordinary
    ``open(path, "w")`` would write through it.  Special targets (see
    :func:`is_special_target`) are written in place.
    """
    if is_special_target(path):
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        return
    target = os.path.realpath(path)
    directory = os.path.dirname(target) or "."
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(target) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
