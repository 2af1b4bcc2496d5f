"""Backing objects opened for serving, and the checks that make every byte trustworthy.

An object is trusted in one of three ways, strongest first:

* **kernel fs-verity** with the digest the image records: the kernel checks every page it
  reads from the file, so reads (and passthrough) need nothing more from us;
* **per-block checking**: the object is hashed once, giving the bottom level of its
  Merkle tree; if that tree's digest is the one the image records, every block a read
  returns is hashed again and compared with its leaf before the bytes leave the server.
  The leaves (32 bytes per 4 KiB, 0.8% of the data) are cached per digest, so the next
  open of the same object costs nothing;
* **unchecked**, only with ``noverify``.

A read whose blocks do not match (the object was changed or truncated after it was
opened) fails with EIO and logs the object's path; no unverified byte is returned.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict

from composefs import fsverity
from composefs.fsverity import BLOCK_SIZE, DIGEST_SIZE

log = logging.getLogger("composefs.fuse")
_WORKERS = min(4, len(os.sched_getaffinity(0)))  # threads hashing one large object


class ObjectError(OSError):
    """An object that cannot be served: missing, or not what the image says it is."""


class BlockHashCache:
    """The bottom Merkle level of recently opened objects, by digest, within a byte budget;
    a per-digest lock makes concurrent first opens hash an object once."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self._budget = budget
        self._used = 0
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[bytes, threading.Lock] = {}

    def get(self, digest: bytes) -> bytes | None:
        with self._lock:
            leaves = self._entries.get(digest)
            if leaves is not None:
                self._entries.move_to_end(digest)
            return leaves

    def put(self, digest: bytes, leaves: bytes) -> None:
        with self._lock:
            if digest in self._entries or len(leaves) > self._budget:
                return
            self._entries[digest] = leaves
            self._used += len(leaves)
            while self._used > self._budget:
                _old, evicted = self._entries.popitem(last=False)
                self._used -= len(evicted)

    def build_lock(self, digest: bytes) -> threading.Lock:
        with self._lock:
            lock = self._building.get(digest)
            if lock is None:
                lock = self._building[digest] = threading.Lock()
            return lock

    def built(self, digest: bytes) -> None:
        with self._lock:
            self._building.pop(digest, None)


class ServedObject:
    """One open backing object: an fd and how its reads are checked."""

    __slots__ = ("digest", "fd", "kernel_verity", "leaves", "name", "root_only", "size")

    def __init__(
        self, fd: int, name: str, size: int, digest: bytes | None, leaves: bytes | None,
        kernel_verity: bool, root_only: bool,
    ) -> None:  # fmt: skip
        self.fd = fd
        self.name = name
        self.size = size
        self.digest = digest
        self.leaves = leaves  # None: reads are not checked here (kernel verity or noverify)
        self.kernel_verity = kernel_verity
        self.root_only = root_only

    def trusted_for_passthrough(self) -> bool:
        """Whether the kernel may read this object without us checking each read: it has
        kernel fs-verity, or it was checked in full and only root can change it."""
        return self.kernel_verity or (self.leaves is not None and self.root_only)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        leaves = self.leaves
        if leaves is None:
            return os.pread(self.fd, end - offset, offset)
        # Read whole blocks: each is checked against its leaf before any byte is used.
        first = offset - offset % BLOCK_SIZE
        last = min(end + (-end % BLOCK_SIZE), self.size)
        data = os.pread(self.fd, last - first, first)
        if len(data) != last - first:
            self._fail(f"ends before byte {last} (read {first}..{last} got {len(data)} bytes)")
        index = first // BLOCK_SIZE * DIGEST_SIZE
        expected = leaves[index : index + -(-len(data) // BLOCK_SIZE) * DIGEST_SIZE]
        if fsverity.hash_blocks(data) != expected:
            self._fail(f"blocks {first // BLOCK_SIZE}..{(last - 1) // BLOCK_SIZE} do not match")
        return data[offset - first : end - first]

    def _fail(self, what: str) -> None:
        log.error("object %s %s its fs-verity digest: refusing the read", self.name, what)
        raise ObjectError(errno.EIO, f"object {self.name} failed verification")


class ObjectDirs:
    """The object directories, opened once; objects are opened below them only.

    A redirect comes from the image, which may be hostile: an object path may not leave
    its directory, by ``..``, an absolute path or a symlink.  Object paths as writers make
    them (``xx/<rest>``) are opened below a kept fd of their ``xx`` directory with
    O_NOFOLLOW, which is as safe as ``openat2`` RESOLVE_BENEATH and costs a plain open;
    anything else goes through :func:`composefs.syscalls.open_beneath`.
    """

    def __init__(self, basedirs: list[str]) -> None:
        self.names = list(basedirs)
        self.fds: list[int] = []
        try:
            for d in basedirs:
                self.fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise
        self._subdirs: dict[tuple[int, bytes], int] = {}
        self._lock = threading.Lock()
        self.trusted: set[str] = set()  # directories only this user or root can change

    def close(self) -> None:
        for fd in [*self.fds, *self._subdirs.values()]:
            if fd >= 0:
                os.close(fd)
        self.fds = []
        self._subdirs = {}

    def _subdir(self, index: int, name: bytes) -> int:
        key = (index, name)
        fd = self._subdirs.get(key)
        if fd is None:
            try:
                fd = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=self.fds[index],
                )  # fmt: skip
            except FileNotFoundError:
                fd = -1  # remembered: most stores hold all 256 or none
            with self._lock:
                if key in self._subdirs:
                    if fd >= 0:
                        os.close(fd)
                    fd = self._subdirs[key]
                else:
                    self._subdirs[key] = fd
        return fd

    def open(self, path: bytes) -> tuple[int, str]:
        """(fd, display name) of the object at ``path`` in the first directory holding it;
        FileNotFoundError if none does."""
        from composefs.syscalls import open_beneath

        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
        head, slash, rest = path.partition(b"/")
        simple = (
            slash and head not in (b"", b".", b"..") and rest not in (b"", b".", b"..")
            and 0x2F not in rest  # an int: no TypeError raised and cleared per test
        )  # fmt: skip
        for index, dir_fd in enumerate(self.fds):
            try:
                if simple:
                    sub = self._subdir(index, head)
                    if sub < 0:
                        continue
                    fd = os.open(rest, flags | os.O_NOFOLLOW, dir_fd=sub)
                else:
                    fd = open_beneath(dir_fd, path, flags)
            except FileNotFoundError:
                continue
            return fd, os.path.join(self.names[index], os.fsdecode(path))
        raise FileNotFoundError(errno.ENOENT, "object not found", os.fsdecode(path))


def open_object(
    dirs: ObjectDirs,
    path: bytes,
    size: int,
    digest: bytes | None,
    *,
    verify: bool,
    cache: BlockHashCache,
) -> ServedObject:
    """Open the object ``path`` (relative to one of the object directories) for a file
    of ``size`` bytes whose image records ``digest``; checks as the module doc says."""
    try:
        fd, name = dirs.open(path)
    except FileNotFoundError:
        log.error("object %s not found in %s", os.fsdecode(path), ":".join(dirs.names))
        raise ObjectError(errno.ENOENT, f"object {os.fsdecode(path)} is missing") from None
    try:
        return _checked(fd, name, size, digest, verify, cache)
    except BaseException:
        os.close(fd)
        raise


def check_object_once(
    dirs: ObjectDirs, path: bytes, size: int, digest: bytes | None, *, foreign: bool
) -> None:
    """Check the object ``path`` of a file the kernel will read without us (overlayfs on
    a metadata-only server): its size, and its fs-verity digest, from the kernel if the
    object has fs-verity (which then checks every page read), else hashed here, once.

    Nothing checks later reads of an object without fs-verity, so unless ``foreign`` the
    object and its directories must be changeable by this user or root alone: owned by
    one of them, not writable by group or others.  Raises :class:`ObjectError` (EIO, or
    ENOENT for a missing object), having logged the object and the reason.
    """
    try:
        fd, name = dirs.open(path)
    except FileNotFoundError:
        log.error("object %s not found in %s", os.fsdecode(path), ":".join(dirs.names))
        raise ObjectError(errno.ENOENT, f"object {os.fsdecode(path)} is missing") from None
    try:
        st = os.fstat(fd)
        if not foreign:
            reason = _writable_by_others(dirs, path, name, st)
            if reason is not None:
                log.error(
                    "object %s: %s, so others could change it after it is checked; refused "
                    "(fs-verity, or allowing foreign objects, would accept it)", name, reason,
                )  # fmt: skip
                raise ObjectError(errno.EIO, f"object {name} is not trusted")
        if digest is None:
            log.error("object %s: the image records no digest to check it against", name)
            raise ObjectError(errno.EIO, f"object {name} cannot be verified")
        if st.st_size != size:
            log.error("object %s has %d bytes, the image says %d", name, st.st_size, size)
            raise ObjectError(errno.EIO, f"object {name} has the wrong size")
        measured = fsverity.measure_verity(fd, st.st_dev)
        if measured is None:
            _leaves, measured = fsverity.block_hashes_fd(fd, size, workers=_WORKERS)
        if measured != digest:
            log.error(
                "object %s has fs-verity digest %s, not %s", name, measured.hex(), digest.hex()
            )
            raise ObjectError(errno.EIO, f"object {name} failed verification")
    finally:
        os.close(fd)


def trusted_owner(st: os.stat_result) -> str | None:
    """None if only this user or root can change the file or directory ``st``, else why
    not ("owned by uid 1000", "writable by group")."""
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by {'group' if st.st_mode & 0o020 else 'others'}"
    return None


def _writable_by_others(dirs: ObjectDirs, path: bytes, name: str, st: os.stat_result) -> str | None:
    """What lets someone else change the object ``name`` (``path`` below its object
    directory): the file itself, or a directory on the way (which could swap it); None if
    nothing does."""
    reason = trusted_owner(st)
    if reason is not None:
        return f"it is {reason}"
    # A directory found safe stays so: only its owner (this user or root) could change
    # that, and only the owner of its (safe) parent could replace it.
    where = name[: len(name) - len(os.fsdecode(path))].rstrip("/") or "/"
    for part in ["", *os.fsdecode(path).split("/")[:-1]]:
        where = os.path.join(where, part) if part else where
        if where in dirs.trusted:
            continue
        reason = trusted_owner(os.stat(where))
        if reason is not None:
            return f"its directory {where} is {reason}"
        dirs.trusted.add(where)
    return None


def _checked(
    fd: int, name: str, size: int, digest: bytes | None, verify: bool, cache: BlockHashCache
) -> ServedObject:
    st = os.fstat(fd)
    actual = st.st_size
    # Only root can change it: the condition for letting the kernel read it unchecked.
    root_only = st.st_uid == 0 and not st.st_mode & 0o022
    if not verify:
        return ServedObject(fd, name, size, digest, None, False, root_only)
    if digest is None:
        log.error("object %s: the image records no digest to check it against", name)
        raise ObjectError(errno.EIO, f"object {name} cannot be verified")
    if actual != size:
        log.error("object %s has %d bytes, the image says %d", name, actual, size)
        raise ObjectError(errno.EIO, f"object {name} has the wrong size")
    measured = fsverity.measure_verity(fd, st.st_dev)
    if measured is not None:
        if measured != digest:
            log.error(
                "object %s has fs-verity digest %s, not %s", name, measured.hex(), digest.hex()
            )
            raise ObjectError(errno.EIO, f"object {name} failed verification")
        return ServedObject(fd, name, size, digest, None, True, root_only)
    leaves = cache.get(digest)
    if leaves is None:
        try:
            with cache.build_lock(digest):
                leaves = cache.get(digest)
                if leaves is None:
                    leaves, computed = fsverity.block_hashes_fd(fd, size, workers=_WORKERS)
                    if computed != digest:
                        log.error(
                            "object %s has fs-verity digest %s, not %s", name, computed.hex(),
                            digest.hex(),
                        )  # fmt: skip
                        raise ObjectError(errno.EIO, f"object {name} failed verification")
                    cache.put(digest, leaves)
        finally:
            cache.built(digest)
    return ServedObject(fd, name, size, digest, leaves, False, root_only)
