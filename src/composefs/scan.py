"""Directory -> Tree, the way the reference ``mkcomposefs SOURCEDIR IMAGE`` reads a tree.

Rules (``docs/format.md`` §13 of the project specs): every entry is ``lstat``-ed; mode,
owner, device number, size and (unless ``use_epoch``) mtime come from it; ``nlink`` is 1
and hardlinks are separate inodes unless ``hardlinks`` is asked for (then one inode under
every name, with the number of names in the tree as its link count); symlink targets via
``readlink``; xattrs via ``listxattr``/``getxattr`` (none with ``skip_xattrs``, only
``user.*`` with ``user_xattrs``); block and character devices dropped with
``skip_devices``.  Every non-empty regular file gets its fs-verity digest and the payload
``xx/<62 hex>``; files of at most 64 bytes are also embedded in the image.

With an :class:`~composefs.objects.ObjectStore`, the content of every file that is not
embedded is added to it.  Digests are computed in ``threads`` worker processes (hashlib
releases the GIL, but handing it between threads costs more than hashing a small file).
Each worker writes its larger copies with direct I/O from two threads of its own, so that
it goes on hashing while they wait for the disk.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import stat
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeGuard

from composefs import fsverity
from composefs.errors import ComposefsError, TreeError
from composefs.objects import (
    DIRECT_MIN,
    ObjectStore,
    ObjectWriter,
    copy_file,
    fill_stage,
    object_name,
    open_stage,
    stage_bytes,
    write_bytes,
)
from composefs.tree import S_IFBLK, S_IFCHR, S_IFMT, Inode, Tree

INLINE_MAX = 64  # the reference embeds files up to this size
# A task handed to a worker process: this many files, or fewer holding this many bytes
# (the last tasks must be small for both workers to finish together).
_BATCH = 256
_BATCH_BYTES = 32 << 20


class ScanError(ComposefsError):
    """A file of the source tree could not be read; names the path and the reason."""

    def __init__(self, path: bytes, err: OSError | TreeError) -> None:
        self.path = path
        reason = err.describe() if isinstance(err, TreeError) else (err.strerror or str(err))
        super().__init__(f"error accessing {os.fsdecode(path)}: {reason}")


@dataclass(frozen=True, slots=True)
class ScanOptions:
    use_epoch: bool = False
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    hardlinks: bool = False
    threads: int = 1


@dataclass(slots=True)
class ScanStats:
    files: int = 0
    bytes: int = 0  # of regular files, all of which get hashed
    to_hash: int = 0  # regular files with content
    hashed_files: int = 0
    hashed_bytes: int = 0
    objects_added: int = 0
    objects_reused: int = 0
    bytes_added: int = 0


Progress = Callable[[ScanStats], None]  # called after each file is hashed


def scan_directory(
    source: str | os.PathLike[str],
    options: ScanOptions = ScanOptions(),
    store: ObjectStore | None = None,
    *,
    progress: Progress | None = None,
    stats: ScanStats | None = None,
    require_verity: bool = False,
) -> Tree:
    """Read the tree below ``source`` (its root is ``source`` itself).

    ``require_verity`` (a secure repository) makes every new object's fs-verity mandatory.
    """
    if options.skip_xattrs and options.user_xattrs:
        raise TreeError(errno.EINVAL, "skip_xattrs and user_xattrs exclude each other")
    stats = stats if stats is not None else ScanStats()
    writer = ObjectWriter(store, require_verity=require_verity) if store is not None else None
    hasher = _Hasher(
        options.threads,
        os.fspath(store.path) if store is not None else None,
        writer.token if writer is not None else "",
    )
    # The scan makes long-lived objects only (an inode per file): the cyclic collector
    # would walk them again and again, freeing nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        tree = _walk(os.fsencode(source), options, hasher, stats)
        _hash_all(hasher, writer, stats, progress)
    except BaseException:
        hasher.close()
        if writer is not None:
            writer.abort()
        raise
    finally:
        if collecting:
            gc.enable()
    hasher.close()
    return tree


def _walk(root_path: bytes, options: ScanOptions, hasher: _Hasher, stats: ScanStats) -> Tree:
    root = _load(root_path, options, hasher, {}, stats)
    if root is None or root.entries is None:
        raise ScanError(root_path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    tree = Tree(root)
    seen: dict[tuple[int, int], Inode] = {}
    stack: list[tuple[Inode, bytes]] = [(root, root_path)]
    while stack:
        directory, path = stack.pop()
        try:
            with os.scandir(path) as it:
                names = [e.name for e in it]
        except OSError as e:
            raise ScanError(path, e) from None
        for name in names:
            child_path = path + b"/" + name
            child = _load(child_path, options, hasher, seen, stats)
            if child is None:
                continue
            assert directory.entries is not None
            directory.add(name, child)
            if child.entries is not None:
                stack.append((child, child_path))
    return tree


def _load(
    path: bytes,
    options: ScanOptions,
    hasher: _Hasher,
    seen: dict[tuple[int, int], Inode],
    stats: ScanStats,
) -> Inode | None:
    try:
        st = os.lstat(path)
    except OSError as e:
        raise ScanError(path, e) from None
    mode = st.st_mode
    ftype = mode & S_IFMT
    if options.skip_devices and ftype in (S_IFCHR, S_IFBLK):
        return None
    linked = options.hardlinks and ftype != stat.S_IFDIR and st.st_nlink > 1
    if linked:
        known = seen.get((st.st_dev, st.st_ino))
        if known is not None:
            known.nlink += 1
            return known
    node = Inode(
        mode,
        1,
        st.st_uid,
        st.st_gid,
        st.st_rdev if ftype in (S_IFCHR, S_IFBLK) else 0,
        st.st_size,
        0 if options.use_epoch else st.st_mtime_ns // 1_000_000_000,
        0 if options.use_epoch else st.st_mtime_ns % 1_000_000_000,
    )
    if linked:
        seen[(st.st_dev, st.st_ino)] = node
    stats.files += 1
    try:
        if ftype == stat.S_IFLNK:
            node.payload = os.readlink(path)
        elif ftype == stat.S_IFREG and st.st_size > 0:
            stats.bytes += st.st_size
            if st.st_size <= INLINE_MAX:
                with open(path, "rb") as f:
                    node.content = f.read(INLINE_MAX + 1)
                if len(node.content) != st.st_size:
                    raise OSError(errno.EIO, "file changed size while it was read")
            hasher.add(node, path, st.st_dev)
        if not options.skip_xattrs:
            for key in os.listxattr(path, follow_symlinks=False):
                if options.user_xattrs and not key.startswith("user."):
                    continue
                value = os.getxattr(path, key, follow_symlinks=False)
                node.set_xattr(os.fsencode(key), value)
    except (OSError, TreeError) as e:
        raise ScanError(path, e) from None
    return node


# Files below this size are read whole into memory, hashed and written from there.
_READ_WHOLE = 8 << 20

# What staging a file gives: its temporary's path, None (nothing to stage), or a write
# still under way in a write thread.
_Staged = str | None | Future[str]


def _hash_file(
    fd: int, size: int, device: int, store_dir: str | None, token: str, writes: Executor
) -> tuple[bytes, _Staged]:
    """Digest of one open file and, with a store, a staged copy of it unless the object
    exists or this run has staged it already (None: the writer counts it as reused).

    Runs in the worker processes.  ``size`` and ``device`` are what the tree recorded from
    ``lstat``: the content must have that size.  Copies of at least ``DIRECT_MIN`` bytes
    are written with direct I/O by ``writes`` (a thread), while this one goes on hashing.
    """
    # A file with fs-verity already carries its digest: the kernel's measurement is the
    # same value without reading the file.
    kernel = fsverity.measure_verity(fd, device)
    if kernel is None and size < _READ_WHOLE:
        # One read, a byte more than the size to see a file that grew; the object is
        # written from the same bytes, so it holds exactly what its name says.
        data = fsverity.read_exact(fd, size)
        digest = fsverity.digest(data)
        if not _to_stage(store_dir, digest):
            return digest, None
        if size < DIRECT_MIN:
            return digest, stage_bytes(store_dir, data, token, digest)
        return digest, _stage_behind(
            writes, store_dir, token, digest, lambda out: write_bytes(out, data, direct=True)
        )
    before = os.fstat(fd)
    if before.st_size != size:
        raise OSError(errno.EAGAIN, "file changed while it was read")
    digest = kernel or fsverity.digest_fd(fd, size=size)
    if not _to_stage(store_dir, digest):
        return digest, None
    src = os.dup(fd)  # the copy outlives this call, and the caller closes ``fd``

    def copy(out: int) -> None:
        try:
            copy_file(src, out, direct=True)
            # An object must hold exactly what its name says: a file written to while it
            # was hashed or copied is refused (as tar does), not stored under a wrong name.
            after = os.fstat(src)
        finally:
            os.close(src)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            before.st_size, before.st_mtime_ns, before.st_ctime_ns
        ):  # fmt: skip
            raise OSError(errno.EAGAIN, "file changed while it was read")

    try:
        staged = _stage_behind(writes, store_dir, token, digest, copy)
    except BaseException:
        os.close(src)
        raise
    if staged is None:
        os.close(src)
    return digest, staged


def _to_stage(store_dir: str | None, digest: bytes) -> TypeGuard[str]:
    """Whether object ``digest`` needs staging: there is a store, and it lacks the object."""
    return store_dir is not None and not os.path.lexists(
        os.path.join(store_dir, object_name(digest))
    )


def _stage_behind(
    writes: Executor, store_dir: str, token: str, digest: bytes, fill: Callable[[int], object]
) -> Future[str] | None:
    """Stage object ``digest`` (None if this run has already), written by ``fill`` in the
    ``writes`` thread."""
    opened = open_stage(store_dir, token, digest)
    if opened is None:
        return None
    return writes.submit(fill_stage, *opened, fill)


_Result = tuple[bytes, str | None] | OSError
_Work = tuple[bytes, int, int, bool]  # path, size, device, whether to stage a copy

# Files opened ahead of the one being hashed, with the kernel reading them in meanwhile:
# at most this many, and no more once those hold this many bytes to read (a large file
# counts for its first _AHEAD_BYTES only; its own sequential reads bring in the rest).
_AHEAD_FILES = 8
_AHEAD_BYTES = 8 << 20


def _opened_ahead(batch: list[_Work]) -> Generator[tuple[_Work, int | OSError], None, None]:
    """Each file of ``batch`` in order, opened (or why not), while the next few are already
    being read into the page cache: the source is often not cached, and a worker waiting
    on one file's read at a time leaves both the disk and the CPU idle.

    Every descriptor is closed when the next file is asked for or the generator is closed.
    """
    ahead: deque[tuple[_Work, int | OSError, int]] = deque()
    ahead_bytes = 0
    try:
        for work in batch:
            while ahead and (len(ahead) >= _AHEAD_FILES or ahead_bytes >= _AHEAD_BYTES):
                ahead_bytes -= yield from _hand_over(ahead)
            path, size, _device, _stage = work
            advised = min(size, _AHEAD_BYTES)
            ahead.append((work, _open_readahead(path, advised), advised))
            ahead_bytes += advised
        while ahead:
            yield from _hand_over(ahead)
    finally:
        for _work, fd, _advised in ahead:
            if isinstance(fd, int):
                os.close(fd)


def _hand_over(
    ahead: deque[tuple[_Work, int | OSError, int]],
) -> Generator[tuple[_Work, int | OSError], None, int]:
    """Yields the oldest file opened ahead, then closes it; returns its bytes advised."""
    work, fd, advised = ahead.popleft()
    try:
        yield work, fd
    finally:
        if isinstance(fd, int):
            os.close(fd)
    return advised


def _open_readahead(path: bytes, length: int) -> int | OSError:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        return e
    if length:
        # Starts the reads without waiting for them; next to nothing for cached pages.  Only
        # advice: where it fails, the file is read all the same.
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
    return fd


# Threads writing a worker's copies with direct I/O: each waits for one write at a time,
# and the disk takes several at once.
_WRITE_THREADS = 2


def _hash_batch(batch: list[_Work], store_dir: str | None, token: str) -> list[_Result]:
    out: list[tuple[bytes, _Staged] | OSError] = []
    files = _opened_ahead(batch)
    # Every write started for this batch ends before it returns (the pool's shutdown waits),
    # whether it failed or not: what it returns is committed, and after a failure, abort
    # must see every temporary file.  The threads live no longer: a process running other
    # threads could no longer fork workers.
    with ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="composefs-write") as writes:
        try:
            for (_path, size, device, stage), fd in files:
                if isinstance(fd, OSError):
                    out.append(fd)
                    continue
                try:
                    staging = store_dir if stage else None
                    out.append(_hash_file(fd, size, device, staging, token, writes))
                except OSError as e:
                    out.append(e)
        finally:
            files.close()
    return [_settled(r) for r in out]


def _settled(result: tuple[bytes, _Staged] | OSError) -> _Result:
    """A result whose write has ended: the path it staged, or why it failed."""
    if isinstance(result, OSError):
        return result
    digest, staged = result
    if isinstance(staged, Future):
        try:
            return digest, staged.result()
        except OSError as e:
            return e
    return digest, staged


class _Hasher:
    """Hashes (and stages) files in worker processes while the tree is still being read.

    Work is handed out in batches as soon as a batch is full; results come back in order.
    Without ``threads > 1``, or for a tree too small to fill a batch, everything runs in
    this process when the results are asked for.
    """

    def __init__(self, threads: int, store_dir: str | None, token: str) -> None:
        self.threads = threads
        self.store_dir = store_dir
        self.token = token
        self.pool: Executor | None = None
        self.work: list[_Work] = []
        self.work_bytes = 0
        self.futures: list[Future[list[_Result]]] = []
        self.jobs: list[tuple[Inode, bytes]] = []  # every file added, with its inode

    def add(self, node: Inode, path: bytes, device: int) -> None:
        """Queue a regular file; a copy is staged in the store unless it is embedded."""
        self.jobs.append((node, path))
        self.work.append((path, node.size, device, node.content is None))
        self.work_bytes += node.size
        if self.threads > 1 and (len(self.work) >= _BATCH or self.work_bytes >= _BATCH_BYTES):
            self._submit()

    def _submit(self) -> None:
        if self.pool is None:
            self.pool = _process_pool(self.threads)
        self.futures.append(self.pool.submit(_hash_batch, self.work, self.store_dir, self.token))
        self.work = []
        self.work_bytes = 0

    def results(self) -> Iterator[_Result]:
        """Every result, in the order the files were added."""
        if self.pool is None:
            yield from _hash_batch(self.work, self.store_dir, self.token)
            return
        if self.work:
            self._submit()
        for future in self.futures:
            yield from future.result()

    def close(self) -> None:
        """Stop the workers (waiting for running batches: nothing is staged after this)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _process_pool(workers: int) -> Executor:
    from composefs.workers import process_pool

    return process_pool(workers)


def _hash_all(
    hasher: _Hasher,
    writer: ObjectWriter | None,
    stats: ScanStats,
    progress: Progress | None,
) -> None:
    stats.to_hash = len(hasher.jobs)
    for (node, path), result in zip(hasher.jobs, hasher.results(), strict=True):
        if isinstance(result, OSError):
            raise ScanError(path, result)
        digest, staged = result
        node.digest = digest
        node.payload = object_name(digest).encode()
        stats.hashed_files += 1
        stats.hashed_bytes += node.size
        if writer is not None and node.content is None:
            if staged is not None:
                writer.adopt(digest, staged, node.size)
            else:
                writer.reused += 1
        if progress is not None:
            progress(stats)
    if writer is not None:
        writer.commit()
        stats.objects_added = writer.added
        stats.objects_reused = writer.reused
        stats.bytes_added = writer.added_bytes
