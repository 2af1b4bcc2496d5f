"""fs-verity file digests (SHA-256, 4096-byte Merkle blocks, no salt) and the verity ioctls.

The digest is the one the kernel reports for a file with fs-verity enabled and that
``fsverity digest`` prints: the Merkle tree over 4096-byte data blocks is reduced to a root
hash, which goes into a 256-byte descriptor, whose SHA-256 is the file digest
(``docs/fsverity.md`` of the project specs, after the kernel's fs-verity documentation).

Speed: hashing is bound by SHA-256 itself.  Data blocks are hashed straight out of large
buffers or a memory map through ``memoryview`` slices (no copies), and a large file can be
split across processes: hashlib releases the GIL for each block, but the hand-over of the
GIL between two threads costs more than a 4 KiB hash, so threads do not scale here.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Callable
from typing import BinaryIO

BLOCK_SIZE = 4096
DIGEST_SIZE = 32
HASH_ALG_SHA256 = 1
LOG_BLOCK_SIZE = 12

_sha256 = hashlib.sha256
_ZERO_BLOCK = bytes(BLOCK_SIZE)
# struct fsverity_descriptor: version, hash_algorithm, log_blocksize, salt_size,
# sig_size (0), data_size, root_hash[64], salt[32], reserved[144].
_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")
assert _DESCRIPTOR.size == 256


def _descriptor_digest(size: int, root_hash: bytes) -> bytes:
    """The digest itself: the hash of the descriptor of a file of ``size`` bytes whose
    Merkle tree has ``root_hash`` at its top."""
    descriptor = _DESCRIPTOR.pack(1, HASH_ALG_SHA256, LOG_BLOCK_SIZE, 0, 0, size, root_hash, b"")
    return _sha256(descriptor).digest()


_EMPTY_DIGEST = _descriptor_digest(0, bytes(DIGEST_SIZE))

# Where hashing is split between processes: below this, forking costs more than it saves.
PARALLEL_MIN_SIZE = 64 << 20
_READ_CHUNK = 8 << 20


def _hash_blocks(data: memoryview) -> bytes:
    """Concatenated SHA-256 of each 4096-byte block of ``data`` (len a multiple of 4096)."""
    sha = _sha256
    return b"".join(
        [sha(data[i : i + BLOCK_SIZE]).digest() for i in range(0, len(data), BLOCK_SIZE)]
    )


class FsVerityHasher:
    """Incremental fs-verity digest, fed with :meth:`update` like a hashlib object.

    ``empty_quirk`` reproduces libcomposefs' userspace digest of an empty file (the root
    hash of one zero block instead of the kernel's all-zero root hash); only
    ``composefs-info measure-file`` compatibility wants it.
    """

    __slots__ = ("_empty_quirk", "_levels", "_pending", "_size")

    def __init__(self, data: bytes | bytearray | memoryview = b"", *, empty_quirk: bool = False):
        self._pending = bytearray()
        # _levels[0] holds the hashes of data blocks, _levels[1] the hashes of blocks of
        # _levels[0], and so on.  A level keeps at most one block until more arrives, so
        # that the top block of the tree is only hashed once it is known to be the top.
        self._levels: list[bytearray] = []
        self._size = 0
        self._empty_quirk = empty_quirk
        if data:
            self.update(data)

    @property
    def size(self) -> int:
        return self._size

    def update(self, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return
        if self._ended():
            raise ValueError("the data ended with a partial block: nothing can follow it")
        self._size += n
        pending = self._pending
        if pending:
            take = min(BLOCK_SIZE - len(pending), n)
            pending += mv[:take]
            mv = mv[take:]
            if len(pending) < BLOCK_SIZE:
                return
            self._push(0, _sha256(pending).digest())
            pending.clear()
        full = len(mv) - len(mv) % BLOCK_SIZE
        if full:
            self._push(0, _hash_blocks(mv[:full]))
        if full < len(mv):
            pending += mv[full:]

    def update_block_hashes(self, hashes: bytes, nbytes: int) -> None:
        """Add the hashes of ``nbytes`` of data whose blocks were hashed elsewhere.

        No partial block may be pending: this is how parallel workers' results are merged
        in order.  ``nbytes`` may end in a partial block (its hash being that of the block
        zero-padded) only in the last call: nothing can be added after it.
        """
        if self._pending or self._ended():
            raise ValueError("block hashes must start on a block boundary")
        if len(hashes) != -(-nbytes // BLOCK_SIZE) * DIGEST_SIZE:
            raise ValueError("block hash count does not match the data size")
        self._size += nbytes
        if hashes:
            self._push(0, hashes)

    def _ended(self) -> bool:
        """Whether a partial last block came as a hash (the pending bytes are always the
        size modulo the block size otherwise)."""
        return self._size % BLOCK_SIZE != len(self._pending)

    def _push(self, level: int, hashes: bytes) -> None:
        _push_into(self._levels, level, hashes)

    def root_hash(self) -> bytes:
        if self._size == 0:
            return _sha256(_ZERO_BLOCK).digest() if self._empty_quirk else bytes(DIGEST_SIZE)
        levels = [bytearray(b) for b in self._levels]
        if self._pending:
            tail = _sha256(bytes(self._pending) + bytes(BLOCK_SIZE - len(self._pending))).digest()
            _push_into(levels, 0, tail)
        level = 0
        while True:
            buf = levels[level]
            if level == len(levels) - 1:
                if level == 0 and len(buf) == DIGEST_SIZE:
                    return bytes(buf)  # a single data block: its hash is the root
                return _sha256(bytes(buf) + bytes(BLOCK_SIZE - len(buf))).digest()
            _push_into(
                levels, level + 1, _sha256(bytes(buf) + bytes(BLOCK_SIZE - len(buf))).digest()
            )
            level += 1

    def digest(self) -> bytes:
        return _descriptor_digest(self._size, self.root_hash())

    def hexdigest(self) -> str:
        return self.digest().hex()


def _push_into(levels: list[bytearray], level: int, hashes: bytes) -> None:
    """Append hashes to a tree level; hash every full block but the last into the next."""
    while True:
        if level == len(levels):
            levels.append(bytearray())
        buf = levels[level]
        buf += hashes
        if len(buf) <= BLOCK_SIZE:
            return
        # The last block may still turn out to be the top of the tree: keep it.
        flush = (len(buf) - 1) // BLOCK_SIZE * BLOCK_SIZE
        hashes = _hash_blocks(memoryview(buf)[:flush])
        del buf[:flush]
        level += 1


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """fs-verity digest of a byte string."""
    if isinstance(data, memoryview):
        data = data.cast("B")
    size = len(data)
    if size <= BLOCK_SIZE:
        # One block (the common small file): its hash is the root, no tree to build.
        if not size:
            return _EMPTY_DIGEST
        root = _sha256(bytes(data) + _ZERO_BLOCK[size:] if size < BLOCK_SIZE else data)
        return _descriptor_digest(size, root.digest())
    level = hash_blocks(data)
    while len(level) > DIGEST_SIZE:
        level = hash_blocks(level)
    return _descriptor_digest(size, level)


def digest_stream(stream: BinaryIO, *, chunk_size: int = _READ_CHUNK) -> bytes:
    """fs-verity digest of everything readable from a binary stream."""
    hasher = FsVerityHasher()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    readinto: Callable[[memoryview], int | None] | None = getattr(stream, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(view)
            if not n:
                break
            hasher.update(view[:n])
        else:
            chunk = stream.read(chunk_size)
            if not chunk:
                break
            hasher.update(chunk)
    return hasher.digest()


def hash_blocks(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of each 4096-byte block of ``data``, concatenated; a last partial block is
    zero-padded, as fs-verity does."""
    mv = memoryview(data).cast("B")
    full = len(mv) - len(mv) % BLOCK_SIZE
    hashes = _hash_blocks(mv[:full])
    if full < len(mv):
        tail = bytes(mv[full:])
        hashes += _sha256(tail + bytes(BLOCK_SIZE - len(tail))).digest()
    return hashes


def _block_hashes_range(fd: int, start: int, end: int) -> bytes:
    """Block hashes of [start, end) of a file, read with pread in large chunks."""
    parts = []
    buf = bytearray(min(_READ_CHUNK, max(end - start, BLOCK_SIZE)))
    view = memoryview(buf)
    offset = start
    while offset < end:
        n = os.preadv(fd, [view[: min(len(buf), end - offset)]], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"file ends at {offset} bytes, {end} expected")
        if n % BLOCK_SIZE and offset + n < end:
            n -= n % BLOCK_SIZE  # a short read: keep chunks block-aligned
            if not n:
                continue
        parts.append(hash_blocks(view[:n]))
        offset += n
    return b"".join(parts)


def block_hashes_fd(fd: int, size: int, *, workers: int = 1) -> tuple[bytes, bytes]:
    """The bottom level of a file's Merkle tree and its fs-verity digest, from ``size``
    bytes read with pread (never mapped: the file may be truncated under us, which must
    give an error, not SIGBUS).  With the block hashes, any one block can later be checked
    on its own.  Large files are hashed by ``workers`` threads (hashlib releases the GIL).
    Raises ``OSError(EIO)`` if the file is shorter than ``size``."""
    if workers > 1 and size >= PARALLEL_MIN_SIZE:
        from concurrent.futures import ThreadPoolExecutor

        step = -(-size // workers // _READ_CHUNK) * _READ_CHUNK
        bounds = [(a, min(a + step, size)) for a in range(0, size, step)]
        with ThreadPoolExecutor(len(bounds)) as pool:
            leaves = b"".join(pool.map(lambda r: _block_hashes_range(fd, *r), bounds))
    else:
        leaves = _block_hashes_range(fd, 0, size)
    hasher = FsVerityHasher()
    hasher.update_block_hashes(leaves, size)
    return leaves, hasher.digest()


def read_exact(fd: int, size: int) -> bytes:
    """The whole content of a file expected to hold ``size`` bytes, read with one more to
    see a file that grew; ``OSError(EIO)`` when its size is not ``size``."""
    data = os.pread(fd, size + 1, 0)
    while len(data) < size:  # a short read before the end
        more = os.pread(fd, size + 1 - len(data), len(data))
        if not more:
            break
        data += more
    if len(data) != size:
        raise OSError(errno.EIO, "file changed size while it was read")
    return data


def _hash_file_range(fd: int, start: int, end: int) -> bytes:
    """Hashes of the full blocks of ``fd`` in [start, end), read through a memory map."""
    with mmap.mmap(fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start) as mm:
        mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            return _hash_blocks(view)
        finally:
            view.release()


def digest_fd(
    fd: int, *, workers: int = 1, empty_quirk: bool = False, size: int | None = None
) -> bytes:
    """fs-verity digest of the whole content of an open regular file.

    With ``workers > 1`` a large file's data blocks are hashed by that many processes.
    ``size`` is the file's size when the caller has just asked for it.
    """
    if size is None:
        size = os.fstat(fd).st_size
    if size < _READ_CHUNK and (size or not empty_quirk):
        return digest(read_exact(fd, size))
    hasher = FsVerityHasher(empty_quirk=empty_quirk)
    full = size - size % BLOCK_SIZE
    if workers > 1 and full >= PARALLEL_MIN_SIZE:
        step = -(-full // workers // BLOCK_SIZE) * BLOCK_SIZE
        bounds = [(s, min(s + step, full)) for s in range(0, full, step)]
        from composefs.workers import process_pool

        with process_pool(len(bounds)) as pool:
            futures = [pool.submit(_hash_file_range_path, _fd_path(fd), s, e) for s, e in bounds]
            for (s, e), fut in zip(bounds, futures, strict=True):
                hasher.update_block_hashes(fut.result(), e - s)
        tail = os.pread(fd, size - full, full) if size > full else b""
        hasher.update(tail)
    else:
        if full:
            hasher.update_block_hashes(_hash_file_range(fd, 0, full), full)
        if size > full:
            hasher.update(os.pread(fd, size - full, full))
    if hasher.size != size:
        raise OSError(errno.EIO, "file changed size while it was hashed")
    return hasher.digest()


def _fd_path(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


def _hash_file_range_path(path: str, start: int, end: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _hash_file_range(fd, start, end)
    finally:
        os.close(fd)


def digest_file(path: str | os.PathLike[str], *, workers: int = 1) -> bytes:
    """fs-verity digest of a file's content (computed in userspace)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, workers=workers)
    finally:
        os.close(fd)


# -- kernel interface (linux/fsverity.h) ----------------------------------------------------

# _IOWR('f', 134, struct fsverity_digest) and _IOW('f', 133, struct fsverity_enable_arg)
FS_IOC_MEASURE_VERITY = 0xC0046686
FS_IOC_ENABLE_VERITY = 0x40806685
_MEASURE_HEADER = struct.Struct("<HH")
# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size, salt_ptr,
# sig_size, __reserved1, sig_ptr, __reserved2[11]
_ENABLE_ARG = struct.Struct("<IIIIQIIQ88x")
assert _ENABLE_ARG.size == 128

# errno values that mean "this file has no fs-verity / the filesystem cannot do it"
NO_VERITY_ERRNOS = frozenset({errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTTY})


# Devices whose filesystem answered that it has no fs-verity at all: not asked again.
_NO_VERITY_DEVICES: set[int] = set()


def _measure(fd: int) -> bytearray:
    """FS_IOC_MEASURE_VERITY: the digest header and room for a 64-byte digest, filled."""
    buf = bytearray(_MEASURE_HEADER.pack(0, 64) + bytes(64))
    fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    return buf


def measure_verity(fd: int, device: int | None = None) -> bytes | None:
    """The kernel's fs-verity digest of an open file, or None if verity is not enabled.

    With ``device`` (the file's ``st_dev``), a filesystem that does not support fs-verity
    at all is remembered and not asked again: scans of many files save a failing ioctl each.
    """
    if device is not None and device in _NO_VERITY_DEVICES:
        return None
    try:
        buf = _measure(fd)
    except OSError as e:
        if e.errno in NO_VERITY_ERRNOS:
            if device is not None and e.errno != errno.ENODATA:
                _NO_VERITY_DEVICES.add(device)
            return None
        raise
    alg, size = _MEASURE_HEADER.unpack_from(buf)
    if alg != HASH_ALG_SHA256 or size != DIGEST_SIZE:
        raise OSError(errno.EILSEQ, "file has fs-verity with an unexpected digest algorithm")
    return bytes(buf[4 : 4 + DIGEST_SIZE])


def verity_supported(path: str | os.PathLike[str]) -> bool:
    """Whether the kernel and the filesystem holding ``path`` can do fs-verity at all.

    Asks for the digest of ``path`` itself (typically a directory): a filesystem with
    fs-verity answers "no digest here" (ENODATA), one without it "not supported".
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _measure(fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
            return False
        if e.errno == errno.ENODATA:
            return True
        raise
    finally:
        os.close(fd)
    return True


def enable_verity(fd: int) -> bool:
    """Enable fs-verity (SHA-256, 4096, no salt) on a file opened read-only.

    Returns False when the filesystem or kernel does not support it; other failures raise.
    A file that already has verity counts as success.
    """
    arg = bytearray(_ENABLE_ARG.pack(1, HASH_ALG_SHA256, BLOCK_SIZE, 0, 0, 0, 0, 0))
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg, True)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return True
        if e.errno in NO_VERITY_ERRNOS:
            return False
        raise
    return True


def measure_file(path: str | os.PathLike[str]) -> bytes:
    """What ``composefs-info measure-file`` prints: the kernel's digest if the file has
    fs-verity, otherwise the userspace digest (with libcomposefs' empty-file quirk)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        kernel = measure_verity(fd)
        if kernel is not None:
            return kernel
        return digest_fd(fd, empty_quirk=True)
    finally:
        os.close(fd)
