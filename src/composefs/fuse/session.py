"""The FUSE connection: mounting, the request loop, unmounting.

The server speaks the kernel protocol on ``/dev/fuse`` itself rather than through libfuse:
nothing to compile, and every feature of the running kernel is reachable (passthrough,
cached directories, no-open directories) whatever libfuse the distribution ships.

As root the connection is mounted with mount(2); as an ordinary user ``fusermount3`` (the
setuid helper of fuse3) mounts it and hands the ``/dev/fuse`` descriptor back over a
socket.  Several threads read requests: while one waits for a disk or hashes a block
(both release the GIL) the others keep answering.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from types import FrameType

from composefs import syscalls
from composefs.errors import ComposefsError
from composefs.fuse import protocol as p
from composefs.fuse.filesystem import Filesystem

log = logging.getLogger("composefs.fuse")

# Big enough for any request a read-only filesystem gets (the largest are names and
# xattr names, well under a page); the kernel insists on at least 8 KiB.
_BUFFER = 64 << 10
_MAX_WRITE = 32 << 10
_MAX_PAGES = 256  # reads of up to 1 MiB
# Objects checked in a pool thread rather than in the request loop: a smaller one costs
# less to hash than the hand-over to a thread.
_POOL_CHECK = 256 << 10


class FuseError(ComposefsError):
    """The FUSE mount could not be made."""


class Connection:
    """A mounted FUSE connection: the ``/dev/fuse`` fd and how to unmount it."""

    def __init__(self, fd: int, mountpoint: str, unmount: Callable[[], None]) -> None:
        self.fd = fd
        self.mountpoint = mountpoint
        self._unmount = unmount
        self._unmounted = False
        self.keep: object = None  # what must live as long as the mount (fusermount3's socket)

    def unmount(self) -> None:
        if not self._unmounted:
            self._unmounted = True
            try:
                self._unmount()
            except OSError as e:
                log.warning("unmounting %s: %s", self.mountpoint, e)


def mount_connection(
    mountpoint: str,
    source: str,
    *,
    allow_other: bool = False,
    auto_unmount: bool = False,
    default_permissions: bool = True,
) -> Connection:
    """Mount an empty FUSE connection read-only at ``mountpoint``.

    Without ``default_permissions`` the kernel checks no permission on the mount's files
    (the lower layer of an overlayfs, which checks them on its own files instead)."""
    mountpoint = os.path.abspath(mountpoint)
    if os.geteuid() == 0:
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise FuseError(f"cannot open /dev/fuse: {e.strerror}") from None
        options = f"fd={fd},rootmode=40000,user_id=0,group_id=0"
        options += ",default_permissions" if default_permissions else ""
        options += ",allow_other" if allow_other else ""
        flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
        try:
            syscalls.mount(source, mountpoint, "fuse.composefs", flags, options)
        except OSError as e:
            os.close(fd)
            raise FuseError(f"cannot mount {mountpoint}: {e.strerror}") from None
        return Connection(fd, mountpoint, lambda: syscalls.umount(mountpoint, syscalls.MNT_DETACH))
    return _fusermount(mountpoint, source, allow_other, auto_unmount, default_permissions)


def _fusermount(
    mountpoint: str, source: str, allow_other: bool, auto_unmount: bool, default_permissions: bool
) -> Connection:
    helper = shutil.which("fusermount3")
    if helper is None:
        raise FuseError("mounting as an ordinary user needs fusermount3 (Debian package fuse3)")
    options = "ro,nosuid,nodev,subtype=composefs"
    options += ",default_permissions" if default_permissions else ""
    options += ",fsname=" + source.replace("\\", "\\\\").replace(",", "\\,")
    if allow_other:
        options += ",allow_other"
    if auto_unmount:
        options += ",auto_unmount"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        helper_proc = subprocess.Popen(
            [helper, "-o", options, "--", mountpoint],
            env=env, pass_fds=[theirs.fileno()], stderr=subprocess.PIPE,
        )  # fmt: skip
        theirs.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        if not fds:
            helper_proc.wait()
            err = (
                helper_proc.stderr.read().decode(errors="replace").strip()
                if helper_proc.stderr
                else ""
            )
            raise FuseError(err or f"fusermount3 could not mount {mountpoint}")
        if not auto_unmount:
            helper_proc.wait()
            ours.close()
        # With auto_unmount fusermount3 stays, watching the socket: it unmounts when this
        # process ends, however it ends.  The socket must stay open until then.
        fd = fds[0]
        os.set_inheritable(fd, False)
    except BaseException:
        ours.close()
        raise

    def unmount() -> None:
        subprocess.run([helper, "-u", "-z", "--", mountpoint], check=False, capture_output=True)

    conn = Connection(fd, mountpoint, unmount)
    if auto_unmount:
        conn.keep = (ours, helper_proc)
    return conn


_OPCODES = (
    "LOOKUP FORGET GETATTR SETATTR READLINK OPEN READ STATFS RELEASE GETXATTR LISTXATTR FLUSH "
    "INIT OPENDIR READDIR RELEASEDIR ACCESS INTERRUPT DESTROY BATCH_FORGET READDIRPLUS"
)
_NAMES = {getattr(p, name): name for name in _OPCODES.split()}  # for -d
_REPLY = p.OUT_HEADER.pack
# where the access mode (the low byte of fuse_open_in.flags) and a release's file
# handle are in a request
_OPEN_ACCMODE = p.IN_HEADER.size + (0 if sys.byteorder == "little" else 3)
_RELEASE_FH = p.IN_HEADER.size
_NO_FH = bytes(8)  # the handle of passed-through opens


class Session:
    """Serves one filesystem on one connection until it is unmounted."""

    def __init__(
        self, fs: Filesystem, conn: Connection, *, threads: int = 4, debug: bool = False
    ) -> None:
        self.fs = fs
        self.conn = conn
        self.threads = max(1, threads)
        self.debug = debug
        self._handlers: dict[int, Callable[[int, memoryview], bytes]] = {
            p.LOOKUP: fs.lookup, p.GETATTR: fs.getattr, p.READLINK: fs.readlink,
            p.OPEN: fs.open, p.READ: fs.read, p.RELEASE: fs.release, p.STATFS: fs.statfs,
            p.READDIR: fs.readdir, p.READDIRPLUS: fs.readdirplus,
        }  # fmt: skip
        self._errors: list[BaseException] = []

    def run(self) -> None:
        """Serve until unmounted; SIGINT and SIGTERM unmount (when called in the main
        thread)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
        pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="fuse-open")
        try:
            self._serve(pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            self.fs.close()
            os.close(self.conn.fd)
        if self._errors:
            raise self._errors[0]

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: unmounting %s", signum, self.conn.mountpoint)
        self.conn.unmount()

    def _serve(self, pool: Executor | None) -> None:
        """One thread reads and answers every request: handing requests between Python
        threads costs more than answering them (the GIL).  Only the requests that must
        open and perhaps hash an object (an open to pass through, or the first read of a
        file the kernel opened without us) go to the pool, so that one large object being
        checked does not hold up everything else."""
        fd = self.conn.fd
        buf = bytearray(_BUFFER)
        view = memoryview(buf)
        header = p.IN_HEADER.unpack_from
        answer = self._answer
        kept = self.fs.has_kept_object
        needs_object = self.fs.read_needs_object
        xattr_needs_object = self.fs.getxattr_needs_object
        open_fast = self.fs.open_passed_through
        release_fast = self.fs.release_passed_through
        reply = _REPLY
        debug = self.debug
        opcode_open, opcode_release = p.OPEN, p.RELEASE
        while True:
            try:
                n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we read it
                if e.errno == errno.ENODEV:
                    return  # unmounted
                self._errors.append(e)
                self.conn.unmount()
                return
            length, opcode, unique, nodeid, uid, _gid, _pid, _ext, _pad = header(buf)
            if debug:
                log.debug("%s node %d (unique %d)", _NAMES.get(opcode, opcode), nodeid, unique)
            # The opens and releases of passed-through files, most of a warm walk's
            # requests: answered here with as little work as can be.
            if opcode == opcode_open:
                if buf[_OPEN_ACCMODE] & os.O_ACCMODE == os.O_RDONLY:
                    tail = open_fast(nodeid)
                    if tail is not None:
                        if self._write(reply(32, 0, unique) + tail):
                            return
                        continue
            elif opcode == opcode_release and buf[_RELEASE_FH : _RELEASE_FH + 8] == _NO_FH:
                release_fast(nodeid)
                if self._write(reply(16, 0, unique)):
                    return
                continue
            body = view[p.IN_HEADER.size : min(length, n)]
            if pool is not None and (
                (opcode == p.OPEN and not kept(nodeid))
                or (opcode == p.READ and needs_object(nodeid, body))
                or (opcode == p.GETXATTR and xattr_needs_object(nodeid, _POOL_CHECK))
            ):
                pool.submit(answer, opcode, unique, nodeid, uid, memoryview(bytes(body)))
                continue
            if answer(opcode, unique, nodeid, uid, body):
                return

    def _answer(self, opcode: int, unique: int, nodeid: int, uid: int, body: memoryview) -> bool:
        """Handle one request and write its reply; True once the connection is gone."""
        try:
            handler = self._handlers.get(opcode)
            if handler is not None:
                data = handler(nodeid, body)
            elif opcode == p.GETXATTR:
                data = self.fs.getxattr(nodeid, body, uid)
            elif opcode == p.LISTXATTR:
                data = self.fs.listxattr(nodeid, body, uid)
            elif opcode in (p.FORGET, p.BATCH_FORGET, p.INTERRUPT):
                return False  # no reply; nothing per node is kept
            elif opcode == p.INIT:
                data = self._init(body)
            elif opcode == p.DESTROY:
                data = b""
            elif opcode in p.WRITING:
                raise OSError(errno.EROFS, "read-only file system")
            else:
                # OPENDIR, FLUSH, ACCESS, locks...: "not implemented" makes the kernel
                # stop asking (directories then open without a round trip and keep
                # their listing cached) or do the work itself.
                raise OSError(errno.ENOSYS, "not implemented")
            reply = _REPLY(16 + len(data), 0, unique) + data
        except OSError as e:
            reply = _REPLY(16, -(e.errno or errno.EIO), unique)
        except Exception:
            log.exception("request %s on node %d failed", _NAMES.get(opcode, opcode), nodeid)
            reply = _REPLY(16, -errno.EIO, unique)
        return self._write(reply)

    def _write(self, reply: bytes) -> bool:
        """Write a reply; True once the connection is gone."""
        try:
            os.write(self.conn.fd, reply)
        except OSError as e:
            if e.errno == errno.ENODEV:
                return True
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                unique = int.from_bytes(reply[8:16], sys.byteorder)
                log.warning("reply to request %d: %s", unique, e)
        return False

    def _init(self, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = p.INIT_IN.unpack_from(body)
        if major != p.KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} is not supported")
        if flags & p.INIT_EXT and len(body) >= p.INIT_IN.size + 4:
            flags |= int.from_bytes(body[16:20], sys.byteorder) << 32
        want = (
            p.ASYNC_READ | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO | p.PARALLEL_DIROPS
            | p.MAX_PAGES | p.CACHE_SYMLINKS | p.BIG_WRITES | p.INIT_EXT
        )  # fmt: skip
        if self.fs.acl:
            # The kernel then enforces and caches the image's ACLs.  Without any (the
            # usual case), EOPNOTSUPP for ACL names, as EROFS mounted noacl answers: the
            # kernel stops asking after the first.
            want |= p.POSIX_ACL
        stack_depth = 0
        if (
            self.fs.options.passthrough
            and flags & p.PASSTHROUGH
            and minor >= p.PASSTHROUGH_MINOR
            and os.geteuid() == 0
        ):
            want |= p.PASSTHROUGH
            stack_depth = 1  # objects live on an ordinary filesystem, not a stacked one
            self.fs.backing_open = self._backing_open
            self.fs.backing_close = self._backing_close
        agreed = flags & want
        log.debug("FUSE %d.%d, flags %#x", major, minor, agreed)
        return p.INIT_OUT.pack(
            p.KERNEL_VERSION, min(minor, p.KERNEL_MINOR), max_readahead,
            agreed & 0xFFFFFFFF, 16, 12, _MAX_WRITE, 1, _MAX_PAGES, 0, agreed >> 32,
            stack_depth,
        )  # fmt: skip

    def _backing_open(self, fd: int) -> int:
        arg = bytearray(p.BACKING_MAP.pack(fd, 0, 0))
        backing_id: int = fcntl.ioctl(self.conn.fd, p.DEV_IOC_BACKING_OPEN, arg, True)
        return backing_id

    def _backing_close(self, backing_id: int) -> None:
        arg = bytearray(backing_id.to_bytes(4, sys.byteorder))
        try:
            fcntl.ioctl(self.conn.fd, p.DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as e:
            log.warning("closing backing file %d: %s", backing_id, e)
