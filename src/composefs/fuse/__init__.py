"""composefs over FUSE: the image served by this process, every byte of content checked.

For users without the kernel path (no root, no EROFS, no data-only overlay layers) and for
tests.  :func:`serve` mounts and serves until the mount goes away; ``composefs-fuse`` is
the command around it.
"""

from __future__ import annotations

import os

from composefs.erofs.reader import Image
from composefs.fuse.filesystem import Filesystem, FuseOptions
from composefs.fuse.session import Connection, FuseError, Session, mount_connection

__all__ = ["Filesystem", "FuseError", "FuseOptions", "load_image", "serve"]


def load_image(path: str | os.PathLike[str]) -> Image:
    """The image, read into memory: a private copy cannot change under the server.
    (:class:`Filesystem` then checks every structure before anything is mounted.)"""
    with open(path, "rb") as f:
        data = f.read()
    return Image(data, name=os.fspath(path))


def serve(
    image: str | os.PathLike[str] | Image | Filesystem,
    mountpoint: str | os.PathLike[str],
    basedirs: list[str] | None = None,
    *,
    options: FuseOptions | None = None,
    allow_other: bool = False,
    auto_unmount: bool = False,
    threads: int = 4,
    debug: bool = False,
    daemonize: bool = False,
) -> None:
    """Mount ``image`` at ``mountpoint`` and serve it until it is unmounted, objects from
    ``basedirs``; raises :class:`~composefs.errors.FormatError` for a malformed image
    before mounting anything.  ``image`` may also be a :class:`Filesystem` made already.

    With ``daemonize`` the call returns once mounted, a child process serving it.
    """
    if isinstance(image, Filesystem):
        fs = image
    else:
        loaded = image if isinstance(image, Image) else load_image(image)
        fs = Filesystem(loaded, basedirs or [], options)
    conn: Connection = mount_connection(
        os.fspath(mountpoint), fs.image.name, allow_other=allow_other, auto_unmount=auto_unmount
    )
    if daemonize and os.fork() != 0:
        os.close(conn.fd)
        fs.close()
        return
    if daemonize:
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        os.close(devnull)
    try:
        Session(fs, conn, threads=threads, debug=debug).run()
    finally:
        if daemonize:
            os._exit(0)
