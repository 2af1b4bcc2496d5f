"""The content-addressed object store: ``XX/<62 hex>`` files named by their fs-verity digest.

Objects are written to a temporary file inside the store and renamed into place, so the
store never shows a partial object.  Durability is batched: :class:`ObjectWriter` copies
every new object first, then makes all of them durable with one ``syncfs`` before any of
them is renamed into place (a crash leaves only ``.tmp*`` files, never a visible object
with unsynced content).  Two writers filling one store at once are safe: names are unique
and a rename over an existing object replaces it with the same content.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import itertools
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from composefs import fsverity

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
OBJECT_MODE = 0o644
# Staged objects made durable and renamed into place together.  Each batch costs a
# syncfs, a flush of the disk's cache that stalls the writes in flight, so batches are
# large; most of their bytes are written with direct I/O, not held dirty.
BATCH_OBJECTS = 32768
BATCH_BYTES = 4 << 30
_DIR_MODE = 0o755
_OBJECT_DIR = re.compile(r"[0-9a-f]{2}")


def object_name(digest: bytes) -> str:
    """``xx/yyyy…``: the store path of a digest (the image's redirect payload)."""
    h = digest.hex()
    return f"{h[:2]}/{h[2:]}"


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # find_library forks


def _syncfs(fd: int) -> None:
    if _libc().syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def copy_file(src_fd: int, dst_fd: int, *, direct: bool = False) -> None:
    """Copy a whole file into the new, empty ``dst_fd``: a reflink where the filesystem
    can, else ``copy_file_range``, or with ``direct`` I/O (see :func:`write_direct`) for a
    file of at least ``DIRECT_MIN`` bytes."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    size = os.fstat(src_fd).st_size
    if direct and size >= DIRECT_MIN:

        def read_into(view: memoryview, offset: int) -> int:
            return os.preadv(src_fd, [view], offset)

        if write_direct(dst_fd, size, read_into):
            return
    offset = 0
    try:
        while offset < size:
            n = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
            if n == 0:
                break
            offset += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(dst_fd, 0, os.SEEK_SET)
    os.ftruncate(dst_fd, 0)
    offset = 0
    while True:
        chunk = os.pread(src_fd, 1 << 20, offset)
        if not chunk:
            break
        os.write(dst_fd, chunk)
        offset += len(chunk)


def write_bytes(fd: int, data: bytes, *, direct: bool = False) -> None:
    """Write all of ``data`` to the new, empty ``fd``; with ``direct`` I/O (see
    :func:`write_direct`) when it holds at least ``DIRECT_MIN`` bytes."""
    view = memoryview(data)
    if direct and len(view) >= DIRECT_MIN:

        def read_into(buf: memoryview, offset: int) -> int:
            n = min(len(buf), len(view) - offset)
            buf[:n] = view[offset : offset + n]
            return n

        if write_direct(fd, len(view), read_into):
            return
    while view:
        view = view[os.write(fd, view) :]


# Direct I/O, for objects of at least this size.  Through the page cache, every byte of
# a new object is copied into newly allocated pages, which costs more CPU than hashing
# it, and is then copied out again by writeback; with O_DIRECT the disk reads it from one
# reused buffer.  The wait for the disk is the caller's, so it belongs in a thread beside
# the hashing (as the scan does).  Below this size, a write through the page cache and
# one writeback for many files costs less than a disk round trip per file.
DIRECT_MIN = 64 << 10
_DIRECT_ALIGN = 4096  # of memory, offsets and lengths: covers any logical block size
_DIRECT_CHUNK = 8 << 20


class _AlignedBuffers:
    """Page-aligned buffers for direct writes, one lent to each write under way: mapped
    once per process and reused (a new mapping for each file would fault its pages in
    again)."""

    def __init__(self) -> None:
        self._free: list[memoryview] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self) -> Iterator[memoryview]:
        with self._lock:
            view = self._free.pop() if self._free else None
        if view is None:
            view = memoryview(mmap.mmap(-1, _DIRECT_CHUNK))
        try:
            yield view
        finally:
            with self._lock:
                self._free.append(view)


_aligned_buffers = _AlignedBuffers()


def write_direct(dst_fd: int, size: int, read_into: Callable[[memoryview, int], int]) -> bool:
    """Write ``size`` bytes to the new, empty file ``dst_fd`` with O_DIRECT, in chunks that
    ``read_into(view, offset)`` puts into an aligned buffer (returning how many bytes).

    False, with nothing written, where the file system refuses direct I/O: the caller
    then writes through the page cache.  The data is durable only after an fsync or
    syncfs, as with a buffered write (its extents are metadata in the page cache).
    """
    flags = fcntl.fcntl(dst_fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(dst_fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    try:
        with _aligned_buffers.lend() as view:
            tail = _write_aligned(dst_fd, size, read_into, view)
    finally:
        fcntl.fcntl(dst_fd, fcntl.F_SETFL, flags)
    if tail is None:
        return False
    # The last partial block goes through the page cache.  Written whole with O_DIRECT
    # and cut back, the file's end would be zeroed by the truncate, which first reads
    # that block back from the disk: a wait of a disk round trip for every object.
    offset = size - len(tail)
    while tail:
        n = os.pwrite(dst_fd, tail, offset)
        tail = tail[n:]
        offset += n
    return True


def _write_aligned(
    fd: int, size: int, read_into: Callable[[memoryview, int], int], view: memoryview
) -> bytes | None:
    """Writes every whole block of the content; returns the bytes of a last partial
    block, left to write, or None if the file system refused (with nothing written)."""
    offset = 0
    while offset < size:
        n = read_into(view[: min(len(view), size - offset)], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"content ends at {offset} bytes, {size} expected")
        if offset + n < size:
            n -= n % _DIRECT_ALIGN  # a short read: keep the next offset aligned
            if not n:
                continue
        whole = n - n % _DIRECT_ALIGN
        done = 0
        while done < whole:
            try:
                done += os.pwrite(fd, view[done:whole], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL and offset + done == 0:
                    return None  # an alignment this file system does not take
                raise
        if whole < n:  # the end of the content
            return bytes(view[whole:n])
        offset += n
    return b""


TEMP_PREFIX = ".tmp-"
_tmp_counter = itertools.count()


def _new_temporary(store_dir: str, token: str) -> tuple[int, str]:
    """A temporary file for content whose digest is not known yet, in the store's top
    directory."""
    while True:
        tmp = os.path.join(store_dir, f"{TEMP_PREFIX}{token}-{os.getpid()}-{next(_tmp_counter)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def open_stage(store_dir: str, token: str, digest: bytes) -> tuple[int, str] | None:
    """A new, empty temporary file for object ``digest``: its descriptor and path, for
    :func:`fill_stage`.

    Any process may call this (the scan's workers do).  The name carries the writer's
    ``token``, so that :meth:`ObjectWriter.abort` can remove every file a failed run
    staged, and the digest, so that content staged twice in one run (by two workers, or
    again before the first copy is committed) is written once: None when this writer has
    staged ``digest`` already.  (A copy staged and deleted would also slow ext4 down:
    without a journal, allocating an inode skips each one deleted in the last minutes.)

    It is made in the object's own ``XX/`` directory: writers then do not all wait for
    the lock of one directory, and the commit renames within a directory.
    """
    h = digest.hex()
    subdir = os.path.join(store_dir, h[:2])
    tmp = os.path.join(subdir, f"{TEMP_PREFIX}{token}-{h[2:]}")
    while True:
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            return None
        except FileNotFoundError:
            # the directory's first object (or a failed writer has just removed it empty)
            with contextlib.suppress(FileExistsError):
                os.mkdir(subdir, _DIR_MODE)


def fill_stage(fd: int, tmp: str, fill: Callable[[int], object]) -> str:
    """Write a new temporary file with ``fill(fd)``, give it the objects' mode and close
    it; returns its path.  On failure it is removed."""
    try:
        fill(fd)
        os.fchmod(fd, OBJECT_MODE)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _stage(store_dir: str, token: str, digest: bytes, fill: Callable[[int], object]) -> str | None:
    opened = open_stage(store_dir, token, digest)
    return fill_stage(*opened, fill) if opened is not None else None


def stage_copy(store_dir: str, src_fd: int, token: str, digest: bytes) -> str | None:
    """Copy ``src_fd`` into a temporary file for object ``digest`` (see :func:`open_stage`);
    None when this writer has staged it already."""
    return _stage(store_dir, token, digest, lambda fd: copy_file(src_fd, fd))


def stage_bytes(store_dir: str, data: bytes, token: str, digest: bytes) -> str | None:
    """Like :func:`stage_copy`, from bytes already read and hashed: the object is then
    exactly what was hashed, whatever happens to the source file meanwhile."""
    return _stage(store_dir, token, digest, lambda fd: write_bytes(fd, data))


def temporary_files(store_dir: str | os.PathLike[str], token: str = "") -> list[str]:
    """The temporary files in a store (relative paths): in its top directory and in its
    ``XX/`` directories.  With ``token``, only those of that writer."""
    prefix = TEMP_PREFIX + (f"{token}-" if token else "")
    found = []
    with os.scandir(store_dir) as top:
        for entry in top:
            if entry.name.startswith(prefix):
                found.append(entry.name)
            elif _OBJECT_DIR.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as sub:
                    found.extend(f"{entry.name}/{e.name}" for e in sub if e.name.startswith(prefix))
    return sorted(found)


class ObjectStore:
    """A directory of objects named by fs-verity digest."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "object store not found", str(path))

    def object_path(self, digest: bytes) -> Path:
        return self.path / object_name(digest)

    def __contains__(self, digest: bytes) -> bool:
        return os.path.lexists(self.object_path(digest))

    def writer(self) -> ObjectWriter:
        return ObjectWriter(self)


class ObjectWriter:
    """Adds objects to a store; everything added becomes visible at :meth:`commit`."""

    def __init__(self, store: ObjectStore, *, require_verity: bool = False) -> None:
        self.store = store
        self.require_verity = require_verity  # a secure repository: see seal_object
        self._pending: dict[bytes, str] = {}  # digest -> temporary path
        self._pending_bytes = 0
        self._committed: set[bytes] = set()  # by earlier batches of this writer
        # names present in each XX/ directory, listed once when first needed: far cheaper
        # than one lstat per file when most objects are already there
        self._present: dict[str, frozenset[str]] = {}
        self._renames_unsynced = False  # renamed into place, not yet made durable
        self.added = 0
        self.added_bytes = 0
        self.reused = 0
        self.token = os.urandom(6).hex()  # names this writer's temporary files

    def contains(self, digest: bytes) -> bool:
        """Whether the object is in the store (as listed when its directory was first read)
        or added by this writer."""
        if digest in self._pending or digest in self._committed:
            return True
        h = digest.hex()
        names = self._present.get(h[:2])
        if names is None:
            try:
                names = frozenset(os.listdir(self.store.path / h[:2]))
            except FileNotFoundError:
                names = frozenset()
            self._present[h[:2]] = names
        return h[2:] in names

    def add_fd(self, src_fd: int, digest: bytes) -> bool:
        """Stage the content of ``src_fd`` as object ``digest``; False if already present.

        An object added by another writer since this one listed its directory is written
        again and renamed over the existing one: the same content, so no harm.
        """
        if self.contains(digest):
            self.reused += 1
            return False
        tmp = stage_copy(os.fspath(self.store.path), src_fd, self.token, digest)
        if tmp is None:  # staged already
            self.reused += 1
            return False
        self.adopt(digest, tmp, os.fstat(src_fd).st_size)
        return True

    def add_stream(self, read: Callable[[int], bytes], size: int) -> bytes:
        """Store exactly ``size`` bytes from ``read`` (a tar member, a download), hashing
        them on the way through; returns their digest.  Nothing is buffered whole.

        The content is written before its name is known, so an object already present
        costs the write of a temporary file (removed at once), not a second read.
        """
        hasher = fsverity.FsVerityHasher()

        def copy(fd: int) -> None:
            with os.fdopen(fd, "wb", closefd=False) as out:
                left = size
                while left:
                    chunk = read(min(left, 1 << 20))
                    if not chunk:
                        raise OSError(errno.EIO, f"content ends {left} bytes early")
                    hasher.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)

        fd, tmp = _new_temporary(os.fspath(self.store.path), self.token)
        fill_stage(fd, tmp, copy)
        digest = hasher.digest()
        if self.contains(digest):
            os.unlink(tmp)
            self.reused += 1
        else:
            self.adopt(digest, tmp, size)
        return digest

    def adopt(self, digest: bytes, tmp: str, size: int = 0) -> None:
        """Take over a temporary file staged by :func:`stage_copy` as object ``digest``."""
        if digest in self._pending or digest in self._committed:
            os.unlink(tmp)  # staged twice (by two workers): keep one
            self.reused += 1
            return
        self._pending[digest] = tmp
        self.added += 1
        self.added_bytes += size
        self._pending_bytes += size
        # Commit in batches: an interrupted run keeps what it wrote (a retry finds it),
        # and temporary files never pile up past one batch.
        if len(self._pending) >= BATCH_OBJECTS or self._pending_bytes >= BATCH_BYTES:
            self._commit_batch()

    def commit(self) -> None:
        """Make every staged object durable, enable fs-verity, rename it into place, and
        make the renames durable: once this returns, a crash loses none of them."""
        self._commit_batch()
        if self._renames_unsynced:
            self._syncfs()
            self._renames_unsynced = False

    def _commit_batch(self) -> None:
        """Make the staged objects durable (one syncfs, which also makes the renames of
        the batch before durable), then rename them into place.

        A crash before their renames are durable leaves some as temporary files, never a
        partial object; :meth:`commit` ends with the syncfs that makes them durable.  One
        syncfs per batch, not two: each flushes the disk's cache, stalling all I/O.
        """
        if not self._pending:
            return
        store = os.fspath(self.store.path)
        prefix = os.path.join(store, "")  # how the stagers name the store: cut, not relpath
        root_fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(root_fd)
            verity = True
            for digest, tmp in self._pending.items():
                if self.require_verity:
                    seal_object(tmp, digest, required=True)
                elif verity:
                    verity = seal_object(tmp, digest)  # stop trying where it is unsupported
                h = digest.hex()
                # relative to the store: no lookup of its path for each object
                name = tmp[len(prefix) :] if tmp.startswith(prefix) else os.path.relpath(tmp, store)
                try:
                    os.rename(name, f"{h[:2]}/{h[2:]}", src_dir_fd=root_fd, dst_dir_fd=root_fd)
                except FileNotFoundError:
                    # No XX/ directory: an object staged in the top directory (a stream)
                    # is its first, or a failed writer removed it empty (see abort).
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(h[:2], _DIR_MODE, dir_fd=root_fd)
                    os.rename(name, f"{h[:2]}/{h[2:]}", src_dir_fd=root_fd, dst_dir_fd=root_fd)
        finally:
            os.close(root_fd)
        self._renames_unsynced = True
        self._committed.update(self._pending)
        self._pending.clear()
        self._pending_bytes = 0

    def _syncfs(self) -> None:
        fd = os.open(self.store.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Remove everything staged for this writer, adopted or not, and the ``XX/``
        directories that held only that."""
        dirs = set()
        for name in temporary_files(self.store.path, self.token):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.store.path / name)
            dirs.add(os.path.dirname(name))
        dirs.discard("")
        for d in dirs:
            with contextlib.suppress(OSError):  # not empty: objects, others' temporaries
                os.rmdir(self.store.path / d)
        self._pending.clear()

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def seal_object(path: str | os.PathLike[str], digest: bytes, *, required: bool = False) -> bool:
    """Enable fs-verity on a finished object; False where the filesystem cannot.

    Best effort, like the reference, unless ``required`` (a secure repository): then
    fs-verity must be enabled and the kernel's measurement must equal ``digest``, which
    also proves the content did not change between hashing and copying.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            enabled = fsverity.enable_verity(fd)
        except OSError:
            if required:
                raise
            return True  # another reason (e.g. file busy): keep trying on later objects
        if not required:
            return enabled
        measured = fsverity.measure_verity(fd) if enabled else None
    finally:
        os.close(fd)
    if measured is None:
        raise OSError(errno.EOPNOTSUPP, "fs-verity is required but cannot be enabled", path)
    if measured != digest:
        raise OSError(errno.EIO, "content changed while it was stored", path)
    return True


_CHECK_BATCH = 256

CheckOutcome = tuple[bytes, bool] | str  # (digest, measured by the kernel) or why unreadable


def _check_batch(root: str, names: list[str]) -> list[CheckOutcome]:
    out: list[CheckOutcome] = []
    for rel in names:
        try:
            fd = os.open(os.path.join(root, rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            out.append(e.strerror or str(e))
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                out.append("not a regular file")
                continue
            kernel = fsverity.measure_verity(fd, st.st_dev)
            out.append((kernel, True) if kernel is not None else (fsverity.digest_fd(fd), False))
        except OSError as e:
            out.append(e.strerror or str(e))
        finally:
            os.close(fd)
    return out


def check_objects(
    root: str | os.PathLike[str],
    names: list[str],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[str, CheckOutcome]]:
    """The digest of every object ``root/XX/…`` named, in worker processes: the kernel's
    measurement where the object has fs-verity (free, and binding), else computed."""
    from composefs.workers import process_pool

    workers = workers or os.cpu_count() or 1
    batches = [names[i : i + _CHECK_BATCH] for i in range(0, len(names), _CHECK_BATCH)]
    done = 0
    if workers == 1 or len(batches) <= 1:
        results: Iterator[list[CheckOutcome]] = (_check_batch(os.fspath(root), b) for b in batches)
        for batch, outcomes in zip(batches, results, strict=True):
            yield from zip(batch, outcomes, strict=True)
            done += len(batch)
            if progress is not None:
                progress(done, len(names))
        return
    with process_pool(workers) as pool:
        futures = [pool.submit(_check_batch, os.fspath(root), b) for b in batches]
        for batch, future in zip(batches, futures, strict=True):
            yield from zip(batch, future.result(), strict=True)
            done += len(batch)
            if progress is not None:
                progress(done, len(names))
