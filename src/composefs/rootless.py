"""Rootless composefs mounts at kernel speed: metadata over FUSE, content by overlayfs.

EROFS cannot be mounted in a user namespace, but overlayfs can, and with ``userxattr`` it
follows ``user.overlay.metacopy`` and ``user.overlay.redirect`` from its lower layer into
data-only layers.  So the FUSE server serves only the image's metadata (names, modes,
xattrs, with overlayfs' own as ``user.overlay.*``; files as placeholders of the right
size, see ``FuseOptions.metadata_only``) and overlayfs, mounted on top of it in the
user's own user and mount namespaces, sends every read straight to the object files:
native speed, and one page cache with every other mount of the same objects, kernel or
rootless.  FUSE only answers lookups, which the kernel caches.

Three processes take part:

* the **server** mounts the FUSE connection on a private temporary directory (through
  ``fusermount3`` as an ordinary user, mount(2) as root) and answers it; it stays in the
  caller's namespaces;
* the **namespace process** is forked from it: it makes a new user namespace (mapping
  only the user's own ids; none as root) and mount namespace, mounts overlayfs there with
  the FUSE mount as its lower layer and the object directories as data-only layers, then
  runs the command (it *becomes* the command) or stays, for processes that join it
  (``nsenter --target PID --user --mount --preserve-credentials``) or reach the tree as
  ``/proc/PID/root/MOUNTPOINT``;
* once overlayfs holds its own reference to the FUSE mount, the server unmounts the
  temporary one: nothing of the stack shows outside the new namespaces.

When the namespaces go away (the command ended, the namespace process was stopped), so do
the overlay and the FUSE mount, and the server ends.  As root the same stack is built
without a user namespace: a private mount namespace for a command, the caller's own when
kept (the mount is then visible to all, like a kernel mount; ``umount`` stops it).

What is verified where:

* the image is read into the server's memory once and walked in full before anything is
  mounted (``digest=`` checks its fs-verity digest there): the metadata cannot change;
* with kernel fs-verity (``verity``, or ``tryverity`` where the object directories have
  it) overlayfs is mounted with ``verity=require``: it compares each object's fs-verity
  digest with the one in the file's ``user.overlay.metacopy`` when it opens it, and
  fs-verity checks every page read.  The server checks nothing;
* without it, the server checks each object once, when overlayfs first looks its file up
  (before overlayfs can follow the file's redirect): size, and fs-verity digest (the
  kernel's measurement if the object has fs-verity, else hashed in full).  A missing or
  wrong object makes its file fail with ENOENT or EIO, logged.  The kernel reads the object
  unchecked afterwards, so objects (and their directories) must be changeable only by the
  user or root, or the file is refused, unless ``foreign_objects`` is given;
* ``verify=False`` (``noverify``) checks nothing.

POSIX ACLs of the image are served as root only: in a user namespace the FUSE mount
cannot enforce them (it would check permissions as the user mounting, who could then not
read the metadata of files the image keeps from them), so they are neither shown nor
applied there.  The user mounting owns the image and the objects anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NamedTuple

from composefs import syscalls
from composefs.errors import FormatError
from composefs.mount import MountApi, MountError, MountOptions, directory_problem

__all__ = [
    "RootlessError",
    "RootlessMount",
    "fuse_unavailable_reason",
    "run",
    "start",
    "userns_unavailable_reason",
]

log = logging.getLogger("composefs.fuse.rootless")

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


class RootlessError(MountError):
    """The stack could not be set up; the message says why."""


class _Spec(NamedTuple):
    """Everything the server and the namespace process need."""

    image: str
    mountpoint: str
    basedirs: tuple[str, ...]
    digest: str | None
    verity: bool  # require kernel fs-verity
    try_verity: bool  # use it where the object directories have it
    check_objects: bool
    command: tuple[str, ...] | None
    userns: bool
    map_root: bool
    verify: bool
    foreign_objects: bool
    acl: bool
    threads: int
    api: MountApi
    detach: bool  # the server leaves the caller's session and stdio once mounted
    debug: bool  # log every request


# -- why it cannot work here --------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def userns_unavailable_reason(proc: str | os.PathLike[str] = "/proc") -> str | None:
    """Why this process cannot make a user namespace, as far as the sysctls tell (None:
    nothing says it cannot; unshare may still be refused, e.g. by seccomp)."""
    root = Path(proc)
    if not (root / "self/ns/user").exists():
        return "the kernel has no user namespaces (CONFIG_USER_NS)"
    if _read_int(root / "sys/user/max_user_namespaces") == 0:
        return "user namespaces are disabled (sysctl user.max_user_namespaces = 0)"
    if os.geteuid() != 0 and _read_int(root / "sys/kernel/unprivileged_userns_clone") == 0:
        return (
            "unprivileged user namespaces are disabled "
            "(sysctl kernel.unprivileged_userns_clone = 0)"
        )
    return None


def _unshare_error(err: int, proc: str = "/proc") -> str:
    """The reason an unshare(CLONE_NEWUSER) failed with ``err``."""
    text = f"unshare(CLONE_NEWUSER): {os.strerror(err)}"
    reason = userns_unavailable_reason(proc)
    if reason is not None:
        return f"{text}: {reason}"
    if err == errno.ENOSPC:
        return f"{text}: the limit user.max_user_namespaces is reached"
    if err == errno.EUSERS:
        return f"{text}: user namespaces nested too deep"
    if err == errno.EINVAL:
        return f"{text}: the kernel has no user namespaces (CONFIG_USER_NS)"
    if err == errno.EPERM:
        return f"{text}: refused by a security policy (seccomp in a container, an LSM)"
    return text


def _restricted_by_apparmor(proc: str = "/proc") -> bool:
    return _read_int(Path(proc) / "sys/kernel/apparmor_restrict_unprivileged_userns") == 1


def fuse_unavailable_reason() -> str | None:
    """Why this process cannot mount FUSE (None: it should be able to)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (the fuse module is not loaded)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        return (
            f"/dev/fuse (mode {mode:04o}) cannot be opened by uid {os.geteuid()}; "
            "ordinary users need it 0666, as distributions ship it"
        )
    if os.geteuid() != 0:
        import shutil

        if shutil.which("fusermount3") is None:
            return "no fusermount3 to mount FUSE as an ordinary user (Debian package fuse3)"
    return None


# -- the namespace process ----------------------------------------------------------------------


def _unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _enter_namespaces(spec: _Spec) -> None:
    """New user (unless root without one) and mount namespaces, mounts private."""
    if spec.userns:
        uid, gid = os.geteuid(), os.getegid()
        try:
            _unshare(CLONE_NEWUSER | CLONE_NEWNS)
        except OSError as e:
            raise RootlessError(
                f"user namespaces are not available: {_unshare_error(e.errno or 0)}"
            ) from None
        inside_uid, inside_gid = (0, 0) if spec.map_root else (uid, gid)
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{inside_uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{inside_gid} {gid} 1")
    else:
        _unshare(CLONE_NEWNS)
    # nothing mounted here propagates out (in a user namespace it could not anyway)
    syscalls.mount("none", "/", "", MS_REC | MS_PRIVATE, "")


def _mount_overlay(spec: _Spec, lower: str, verity: bool) -> None:
    """overlayfs at the mount point: ``lower`` (the FUSE mount) the only ordinary layer,
    the object directories data-only layers, overlayfs' xattrs in ``user.overlay.``.
    (``metacopy=on`` and ``redirect_dir=on`` are refused with ``userxattr``; overlayfs
    follows a metacopy file's absolute redirect into data-only layers without them.)"""
    # The FUSE root inode has placeholder attributes (mode 0, the mounting user) until
    # asked for them, and overlayfs copies its root's attributes when mounted: ask first.
    os.stat(lower)
    if spec.api != "legacy":
        try:
            ctx = syscalls.FsContext("overlay")
        except OSError as e:
            if e.errno != errno.ENOSYS or spec.api == "new":
                raise
        else:
            with ctx:
                ctx.set_string("source", "composefs")
                ctx.set_flag("userxattr")
                if verity:
                    ctx.set_string("verity", "require")
                try:
                    ctx.set_string("lowerdir+", lower)
                except OSError as e:
                    if e.errno != errno.EINVAL or spec.api == "new":
                        raise
                    # before Linux 6.8: no lowerdir+, the legacy option string below
                else:
                    for basedir in spec.basedirs:
                        ctx.set_string("datadir+", basedir)
                    ctx.create()
                    mount_fd = syscalls.fsmount(ctx, syscalls.MOUNT_ATTR_RDONLY)
                    try:
                        syscalls.move_mount(mount_fd, spec.mountpoint)
                    finally:
                        os.close(mount_fd)
                    return
    from composefs.mount import _escape_legacy

    layers = "::".join(_escape_legacy(d) for d in (lower, *spec.basedirs))
    data = f"userxattr,lowerdir={layers}" + (",verity=require" if verity else "")
    syscalls.mount("composefs", spec.mountpoint, "overlay", syscalls.MS_RDONLY, data)


def _describe_mount_error(e: OSError, spec: _Spec) -> str:
    text = e.strerror or str(e)
    if e.errno == errno.ENODEV:
        text += " (the kernel has no overlayfs)"
    elif e.errno == errno.EPERM and spec.userns:
        if _restricted_by_apparmor():
            text += (
                " (AppArmor restricts unprivileged user namespaces: sysctl "
                "kernel.apparmor_restrict_unprivileged_userns = 1)"
            )
        else:
            text += " (overlayfs in a user namespace needs Linux 5.11 or later)"
    elif e.errno == errno.EINVAL and spec.api != "new":
        text += " (data-only layers need Linux 6.5 or later)"
    return text


def _namespace_process(spec: _Spec, lower: str, verity: bool, report: int) -> None:
    """The namespace process: namespaces, the overlay; then the command or a long sleep.
    Says "ok" or the error on ``report``; never returns."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    try:
        try:
            if spec.userns or spec.command is not None:
                _enter_namespaces(spec)
            _mount_overlay(spec, lower, verity)
        except OSError as e:
            raise RootlessError(
                f"cannot mount overlayfs at {spec.mountpoint}: {_describe_mount_error(e, spec)}"
            ) from None
    except RootlessError as e:
        os.write(report, json.dumps({"error": str(e)}).encode() + b"\n")
        os._exit(1)
    except BaseException as e:  # reported; the process ends
        os.write(report, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
        os._exit(1)
    os.write(report, b'{"ok": true}\n')
    os.close(report)
    if spec.command is not None:
        # what Python changed at start-up and exec would keep
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        program = spec.command[0]
        if "/" not in program:
            import shutil

            program = shutil.which(program) or program
            if "/" not in program:
                os.write(2, f"composefs-fuse: {program}: command not found\n".encode())
                os._exit(127)
        try:
            os.execv(program, list(spec.command))
        except OSError as e:
            os.write(2, f"composefs-fuse: {spec.command[0]}: {e.strerror}\n".encode())
            os._exit(127 if e.errno == errno.ENOENT else 126)
    if not spec.userns:
        os._exit(0)  # mounted in the caller's namespace: nothing to hold
    if spec.detach:
        _detach()
    while True:
        signal.pause()  # holds the namespaces until stopped


# -- the server --------------------------------------------------------------------------------


class _Stack:
    """The server's side: set up (:meth:`setup`), then serve (:meth:`serve`)."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.ns_pid = 0
        self.checks = ""
        self._tmp: str | None = None
        self._conn: object = None
        self._session_thread: threading.Thread | None = None
        self._ns_status: int | None = None

    # setup

    def setup(self) -> None:
        """Mount the stack, or raise :class:`RootlessError` (or FormatError) having undone
        everything."""
        from composefs.erofs.reader import Image
        from composefs.fuse import Filesystem, FuseOptions
        from composefs.fuse.session import FuseError, Session, mount_connection

        spec = self.spec
        reason = fuse_unavailable_reason()
        if reason is not None:
            raise RootlessError(f"FUSE is not available: {reason}")
        if spec.userns:
            reason = userns_unavailable_reason()
            if reason is not None:
                raise RootlessError(f"user namespaces are not available: {reason}")
        self._check_directories()
        verity = self._kernel_verity()
        try:
            with open(spec.image, "rb") as f:
                data = f.read()  # a private copy: nothing can change it under the server
        except OSError as e:
            raise RootlessError(f"Failed to open {spec.image}: {e.strerror}") from None
        if spec.digest:
            from composefs import fsverity

            if fsverity.digest(data) != bytes.fromhex(spec.digest):
                raise RootlessError(f"Failed to mount {spec.image}: Image has wrong fs-verity")
        options = FuseOptions(
            verify=spec.verify, acl=spec.acl and not spec.userns, metadata_only=True,
            kernel_verity=verity, foreign_objects=spec.foreign_objects,
        )  # fmt: skip
        try:
            fs = Filesystem(Image(data, name=spec.image), list(spec.basedirs), options)
        except FormatError as e:
            raise RootlessError(f"Failed to load {spec.image}: {e.message}") from None
        try:
            if spec.check_objects:
                self._check_objects(fs)
            self._tmp = tempfile.mkdtemp(prefix="composefs-meta-")
            try:
                conn = mount_connection(self._tmp, spec.image, default_permissions=False)
            except FuseError as e:
                raise RootlessError(f"FUSE is not available: {e}") from None
        except BaseException:
            fs.close()
            self._remove_tmp()
            raise
        self._conn = conn
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the namespace process
            os.close(report_r)
            os.close(conn.fd)
            _namespace_process(spec, self._tmp, verity, report_w)
        self.ns_pid = pid
        os.close(report_w)
        session = Session(fs, conn, threads=spec.threads, debug=spec.debug)
        self._session_thread = threading.Thread(
            target=self._serve_session, args=(session,), name="fuse", daemon=True
        )
        self._session_thread.start()
        with os.fdopen(report_r, "rb") as f:
            line = f.readline()
        try:
            answer = json.loads(line) if line else {}
        except ValueError:
            answer = {}
        if not answer.get("ok"):
            self._reap(wait=True)
            conn.unmount()
            self._session_thread.join(5)
            self._remove_tmp()
            raise RootlessError(
                answer.get("error") or f"the namespace process ended ({self._ns_status})"
            )
        # overlayfs holds its own reference now: the temporary mount can go
        conn.unmount()
        self._remove_tmp()
        if not spec.verify:
            self.checks = "none (noverify)"
        elif verity:
            self.checks = "kernel fs-verity on every read (overlayfs verity=require)"
        else:
            self.checks = "each object once, by the server, before overlayfs may read it"
            log.warning(
                "no kernel fs-verity for %s: each object is checked once, when its file is "
                "first looked up; the kernel reads it unchecked afterwards",
                ":".join(spec.basedirs),
            )

    def _check_directories(self) -> None:
        spec = self.spec
        for role, path in [
            ("mount point", spec.mountpoint), *(("object directory", d) for d in spec.basedirs)
        ]:  # fmt: skip
            reason = directory_problem(path)
            if reason is not None:
                raise RootlessError(f"{role} {path}: {reason}")

    def _kernel_verity(self) -> bool:
        """Whether overlayfs checks the objects itself (``verity=require``); refuses object
        directories others could change when it does not (unless told)."""
        from composefs import fsverity
        from composefs.fuse.verify import trusted_owner

        spec = self.spec
        if spec.verity or spec.try_verity:
            unsupported = [d for d in spec.basedirs if not fsverity.verity_supported(d)]
            if not unsupported:
                return True
            if spec.verity:
                raise RootlessError(
                    f"verity requested, but fs-verity is not available for {unsupported[0]} "
                    "(kernel or filesystem without fs-verity)"
                )
        if spec.verify and not spec.foreign_objects:
            for d in spec.basedirs:
                reason = trusted_owner(os.stat(d))
                if reason is not None:
                    raise RootlessError(
                        f"object directory {d} is {reason}: without fs-verity objects are "
                        "checked once and then read unchecked, so others must not be able "
                        "to change them (foreign_objects accepts it)"
                    )
        return False

    def _check_objects(self, fs: object) -> None:
        from composefs.erofs.reader import Image
        from composefs.imageinfo import missing_objects, object_paths

        image = fs.image  # type: ignore[attr-defined]
        assert isinstance(image, Image)
        wanted = object_paths(image.to_tree())
        for basedir in self.spec.basedirs:
            wanted = missing_objects(wanted, basedir)
        if wanted:
            first = os.fsdecode(sorted(wanted)[0])
            raise RootlessError(
                f"Failed to mount {self.spec.image}: {len(wanted)} object(s) missing from "
                f"{':'.join(self.spec.basedirs)}, first {first}"
            )

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            try:
                os.rmdir(self._tmp)
            except OSError as e:
                log.warning("removing %s: %s", self._tmp, e.strerror)
            self._tmp = None

    def _serve_session(self, session: object) -> None:
        try:
            session.run()  # type: ignore[attr-defined]
        except Exception:
            log.exception("the FUSE session failed")

    # serving

    def _reap(self, *, wait: bool) -> bool:
        """Collect the namespace process's status; True once it has ended."""
        if self._ns_status is not None:
            return True
        try:
            pid, status = os.waitpid(self.ns_pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            self._ns_status = 0
            return True
        if pid == 0:
            return False
        self._ns_status = os.waitstatus_to_exitcode(status)
        return True

    def serve(self) -> int:
        """Until the command ends (its status is returned: 128 + N for a signal), or,
        without one, until stopped by SIGTERM, SIGINT or SIGHUP or unmounted."""
        spec = self.spec
        assert self._session_thread is not None
        if spec.detach:
            _detach()
        stop = threading.Event()

        def forward(signum: int, _frame: FrameType | None) -> None:
            if spec.command is not None:
                _kill(self.ns_pid, signum)
            else:
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        # A command gets the terminal's SIGINT and SIGQUIT itself and decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN if spec.command is not None else forward)
        if spec.command is not None:
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)
            self._reap(wait=True)
            code = self._ns_status or 0
            status = 128 - code if code < 0 else code
            # the namespaces go with the command (unless it left processes behind), and
            # with them the overlay and the FUSE mount: the session then ends
            self._session_thread.join(2)
            return status
        while not stop.is_set() and self._session_thread.is_alive():
            stop.wait(0.5)
            self._reap(wait=False)
        if self._session_thread.is_alive():
            if spec.userns:
                _kill(self.ns_pid, signal.SIGTERM)
            else:
                try:
                    syscalls.umount(spec.mountpoint, syscalls.MNT_DETACH)
                except OSError as e:
                    log.warning("unmounting %s: %s", spec.mountpoint, e.strerror)
            self._reap(wait=True)
            self._session_thread.join(2)
        self._reap(wait=False)
        return 0


def _detach() -> None:
    """Leave the caller's session and terminal, stdio to /dev/null (a daemon)."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -- the API ----------------------------------------------------------------------------------


def _make_spec(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    options: MountOptions,
    command: Sequence[str] | None,
    userns: bool | None,
    map_root: bool,
    verify: bool,
    foreign_objects: bool,
    acl: bool,
    threads: int,
    api: MountApi,
    detach: bool,
    debug: bool,
) -> _Spec:
    options.validate()
    if options.upperdir is not None:
        raise RootlessError("upperdir/workdir are not supported by rootless mounts")
    if options.idmap is not None:
        raise RootlessError("idmap is not supported by rootless mounts")
    if command is not None and not command:
        raise RootlessError("an empty command")
    if userns is None:
        userns = os.geteuid() != 0
    elif not userns and os.geteuid() != 0:
        raise RootlessError("without a user namespace the stack needs root")
    return _Spec(
        image=os.path.abspath(image), mountpoint=os.path.abspath(mountpoint),
        basedirs=tuple(os.path.abspath(d) for d in options.basedirs), digest=options.digest,
        verity=options.verity, try_verity=options.try_verity,
        check_objects=options.check_objects,
        command=tuple(command) if command is not None else None, userns=userns,
        map_root=map_root, verify=verify, foreign_objects=foreign_objects, acl=acl,
        threads=max(1, threads), api=api, detach=detach, debug=debug,
    )  # fmt: skip


class RootlessMount:
    """A running stack: the server process and the namespace process (the command, when
    there is one).  :meth:`wait` for it to end, :meth:`stop` it; a context manager."""

    def __init__(self, pid: int, ns_pid: int, spec: _Spec, checks: str) -> None:
        self.pid = pid  # the server
        self.ns_pid = ns_pid  # the namespace process (the command, with one)
        self.mountpoint = spec.mountpoint  # as seen in the namespace
        self.userns = spec.userns
        self.private = spec.userns or spec.command is not None
        self.checks = checks  # what checks the content, in words
        self.returncode: int | None = None

    @property
    def path(self) -> str:
        """Where processes outside the namespaces reach the tree (the user who mounted
        it and root): ``/proc/PID/root/MOUNTPOINT``, or the mount point itself when
        mounted in the caller's namespace."""
        if self.private:
            return f"/proc/{self.ns_pid}/root{self.mountpoint}"
        return self.mountpoint

    def join_command(self) -> list[str]:
        """The command prefix that runs a program in the namespaces (util-linux nsenter)."""
        if not self.private:
            return []
        if self.userns:
            return ["nsenter", f"--target={self.ns_pid}", "--user", "--mount",
                    "--preserve-credentials"]  # fmt: skip
        return ["nsenter", f"--target={self.ns_pid}", "--mount"]

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The server's exit status once it has ended: the command's (128 + N for a
        signal N), or 0; TimeoutError after ``timeout`` seconds."""
        if self.returncode is not None:
            return self.returncode
        if timeout is None:
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        import time

        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the rootless mount {self.mountpoint} is still running")
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def stop(self, timeout: float = 10) -> int:
        """Unmount: stop the server (and the namespace process); its exit status."""
        if self.poll() is None:
            _kill(self.pid, signal.SIGTERM)
            try:
                return self.wait(timeout)
            except TimeoutError:
                _kill(self.pid, signal.SIGKILL)
                _kill(self.ns_pid, signal.SIGKILL)
        return self.wait()

    def __enter__(self) -> RootlessMount:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    options: MountOptions,
    *,
    command: Sequence[str] | None = None,
    userns: bool | None = None,
    map_root: bool = False,
    verify: bool = True,
    foreign_objects: bool = False,
    acl: bool = True,
    threads: int = 4,
    api: MountApi = "auto",
    detach: bool = False,
    debug: bool = False,
) -> RootlessMount:
    """Mount ``image`` at ``mountpoint`` as the module doc says, served by a new child
    process; returns once mounted (raising :class:`RootlessError` with the reason if it
    cannot be).  See :func:`composefs.mount.mount_rootless`."""
    spec = _make_spec(
        image, mountpoint, options, command, userns, map_root, verify, foreign_objects, acl,
        threads, api, detach, debug,
    )  # fmt: skip
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the server
        status = 1
        try:
            os.close(report_r)
            stack = _Stack(spec)
            try:
                stack.setup()
            except (MountError, FormatError, OSError) as e:
                os.write(report_w, json.dumps({"error": str(e)}).encode() + b"\n")
                os._exit(1)
            answer = {"ok": True, "ns_pid": stack.ns_pid, "checks": stack.checks}
            os.write(report_w, json.dumps(answer).encode() + b"\n")
            os.close(report_w)
            status = stack.serve()
        except BaseException:
            log.exception("rootless mount of %s", spec.image)
        finally:
            os._exit(status)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as f:
        line = f.readline()
    try:
        answer = json.loads(line) if line else {}
    except ValueError:
        answer = {}
    if not answer.get("ok"):
        _pid, status = os.waitpid(pid, 0)
        raise RootlessError(
            answer.get("error")
            or f"the server ended before mounting (status {os.waitstatus_to_exitcode(status)})"
        )
    return RootlessMount(pid, int(str(answer["ns_pid"])), spec, str(answer["checks"]))


def run(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    options: MountOptions,
    *,
    command: Sequence[str] | None = None,
    userns: bool | None = None,
    map_root: bool = False,
    verify: bool = True,
    foreign_objects: bool = False,
    acl: bool = True,
    threads: int = 4,
    api: MountApi = "auto",
    debug: bool = False,
    on_mounted: Callable[[int, str], None] | None = None,
) -> int:
    """As :func:`start`, but this process is the server: returns the command's exit status
    once it has ended, or 0 once the stack is stopped (SIGTERM, SIGINT, SIGHUP).  Takes
    over this process's signal handlers; what composefs-fuse runs.  ``on_mounted(ns_pid,
    checks)`` is called once mounted (``ns_pid`` 0 when mounted in this process's own
    namespaces)."""
    spec = _make_spec(
        image, mountpoint, options, command, userns, map_root, verify, foreign_objects, acl,
        threads, api, False, debug,
    )  # fmt: skip
    stack = _Stack(spec)
    stack.setup()
    if on_mounted is not None:
        on_mounted(stack.ns_pid if spec.userns or spec.command else 0, stack.checks)
    return stack.serve()
