"""Linux interfaces the ``os`` module lacks: the new mount API, mount(2), loop devices.

Every wrapper raises ``OSError`` with the errno (and, for the mount API, the kernel's own
message from the filesystem context log when there is one), so callers handle them like any
other ``os`` call.  The mount-API syscall numbers are the same on every architecture Linux
unified its tables for (all but alpha), so no per-architecture table is needed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable

__all__ = [
    "AT_EMPTY_PATH",
    "MNT_DETACH",
    "MOUNT_ATTR_IDMAP",
    "MOUNT_ATTR_RDONLY",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_RDONLY",
    "MS_SILENT",
    "FsContext",
    "fsmount",
    "loop_attach",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_beneath",
    "umount",
]

_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOUNT_SETATTR = 442
_SYS_OPENAT2 = 437

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_IDMAP = 0x00100000
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_SILENT = 0x8000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str, detail: Callable[[], str | None] | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        extra = detail() if detail is not None else None
        message = os.strerror(err) if not extra else f"{os.strerror(err)} ({extra})"
        raise OSError(err, message, what)
    return result


def _sys(number: int, *args: object) -> int:
    result: int = _syscall(ctypes.c_long(number), *args)
    return result


def _path(path: str | bytes) -> bytes:
    return os.fsencode(path)


class FsContext:
    """A filesystem context from ``fsopen(2)``: configure with :meth:`set_flag` and
    :meth:`set_string`, then :meth:`create` the superblock and :func:`fsmount` it.

    Errors carry the kernel's explanation (``overlayfs: failed to resolve 'x': -2``) read
    from the context's message log, which is far more useful than a bare EINVAL.
    """

    def __init__(self, fstype: str) -> None:
        self.fstype = fstype
        result = _sys(_SYS_FSOPEN, ctypes.c_char_p(fstype.encode()), ctypes.c_uint(FSOPEN_CLOEXEC))
        self.fd = _check(result, f"fsopen({fstype})")

    def __enter__(self) -> FsContext:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _config(self, cmd: int, key: bytes | None, value: bytes | None, aux: int) -> None:
        result = _sys(
            _SYS_FSCONFIG, ctypes.c_int(self.fd), ctypes.c_uint(cmd),
            ctypes.c_char_p(key), ctypes.c_char_p(value), ctypes.c_int(aux),
        )  # fmt: skip
        what = self.fstype if key is None else f"{self.fstype} {key.decode(errors='replace')}"
        _check(result, what, self.messages)

    def set_flag(self, key: str) -> None:
        self._config(FSCONFIG_SET_FLAG, key.encode(), None, 0)

    def set_string(self, key: str, value: str | bytes) -> None:
        self._config(FSCONFIG_SET_STRING, key.encode(), _path(value), 0)

    def create(self) -> None:
        self._config(FSCONFIG_CMD_CREATE, None, None, 0)

    def messages(self) -> str | None:
        """The kernel's messages for this context (drained), joined; None if there are none."""
        lines = []
        while True:
            try:
                raw = os.read(self.fd, 1024)
            except OSError:
                break  # ENODATA: the log is empty
            if not raw:
                break
            # Each message is "e ", "w " or "i " and the text.
            lines.append(raw.decode(errors="replace")[2:].strip())
        return "; ".join(lines) or None


def fsmount(ctx: FsContext, attr_flags: int = 0) -> int:
    """A detached mount of the context's superblock; returns its file descriptor."""
    result = _sys(
        _SYS_FSMOUNT, ctypes.c_int(ctx.fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
        ctypes.c_uint(attr_flags),
    )  # fmt: skip
    return _check(result, f"fsmount({ctx.fstype})", ctx.messages)


def move_mount(mount_fd: int, target: str | bytes) -> None:
    """Attach a detached mount at ``target``."""
    result = _sys(
        _SYS_MOVE_MOUNT, ctypes.c_int(mount_fd), ctypes.c_char_p(b""),
        ctypes.c_int(AT_FDCWD), ctypes.c_char_p(_path(target)),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )  # fmt: skip
    _check(result, os.fsdecode(target))


def mount_setattr(mount_fd: int, attr_set: int, userns_fd: int = 0) -> None:
    """Change attributes of a mount given by fd (e.g. make it idmapped)."""
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    result = _sys(
        _SYS_MOUNT_SETATTR, ctypes.c_int(mount_fd), ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )  # fmt: skip
    _check(result, "mount_setattr")


RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_OPEN_HOW = struct.Struct("=QQQ")  # flags mode resolve
_openat2_missing = False


def open_beneath(dir_fd: int, path: bytes, flags: int) -> int:
    """Open ``path`` below the directory ``dir_fd`` without ever leaving it: no ``..``
    out, no absolute path, no symlink anywhere on the way (``openat2`` with
    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS).  On kernels without openat2 (before 5.6) the
    same is enforced by refusing such paths and opening with O_NOFOLLOW."""
    global _openat2_missing
    if not _openat2_missing:
        how = ctypes.create_string_buffer(
            _OPEN_HOW.pack(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        )
        result = _sys(
            _SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(path), how,
            ctypes.c_size_t(_OPEN_HOW.size),
        )  # fmt: skip
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        _openat2_missing = True
    parts = path.split(b"/")
    if path.startswith(b"/") or any(p in (b"", b".", b"..") for p in parts):
        raise OSError(errno.EXDEV, "path leaves its directory", os.fsdecode(path))
    return os.open(path, flags | os.O_NOFOLLOW, dir_fd=dir_fd)


def mount(source: str | bytes, target: str | bytes, fstype: str, flags: int, data: str) -> None:
    """The legacy ``mount(2)``."""
    result = _libc.mount(
        ctypes.c_char_p(_path(source)), ctypes.c_char_p(_path(target)),
        ctypes.c_char_p(fstype.encode()), ctypes.c_ulong(flags),
        ctypes.c_char_p(data.encode() if data else None),
    )  # fmt: skip
    _check(result, os.fsdecode(target))


def umount(target: str | bytes, flags: int = 0) -> None:
    _check(_libc.umount2(ctypes.c_char_p(_path(target)), ctypes.c_int(flags)), os.fsdecode(target))


# -- loop devices ----------------------------------------------------------------------------

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
# struct loop_config: fd, block_size, struct loop_info64, 8 reserved u64.
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s64x")
assert _LOOP_INFO64.size == 232 and _LOOP_CONFIG.size == 304


def loop_attach(backing_fd: int, name: str, *, direct_io: bool = True) -> tuple[str, int]:
    """Attach ``backing_fd`` to a free loop device, read-only with autoclear (the device
    detaches itself when its last user goes away).

    Returns the device path and an open fd of it: autoclear fires on the last close, so
    the caller keeps the fd until the filesystem is mounted on the device, then closes it.
    Direct I/O is asked for to avoid caching the image twice, and dropped when the backing
    file cannot do it (tmpfs, memfd).
    """
    flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, os.fsencode(name)[:63], b"", b"", 0, 0)
    config = _LOOP_CONFIG.pack(backing_fd, 4096, info)
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _attempt in range(100):
            number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            try:
                loop_fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                time.sleep(0.01)  # udev has not created the node yet
                continue
            try:
                fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, config)
                return device, loop_fd
            except OSError as e:
                os.close(loop_fd)
                if e.errno == errno.EBUSY:
                    continue  # another process took it between GET_FREE and CONFIGURE
                if e.errno == errno.EINVAL and direct_io:
                    return loop_attach(backing_fd, name, direct_io=False)
                raise OSError(e.errno, e.strerror, device) from None
        raise OSError(errno.EBUSY, "no free loop device", "/dev/loop-control")
    finally:
        os.close(control)
