"""Reading composefs images: lazy lookups for tools and servers, and image -> Tree.

The image is mapped (``mmap``) or taken as bytes; nothing is parsed until asked for, so
resolving ``/a/b/c`` reads the superblock, the inodes on that path and their directory
blocks, nothing else.  Every offset, count and length that comes from the image is checked
against the image before it is used: a malformed or hostile image raises
:class:`~composefs.errors.FormatError` naming the offset or inode, never an unrelated
exception, unbounded recursion or memory use out of proportion to the image size.

:meth:`Image.to_tree` maps the overlayfs xattrs back the way the reference's reader does
(``docs/dumpfile.md`` §5.3 of the project specs): the redirect becomes the payload, the
metacopy digest the digest, escaped whiteouts become whiteouts again, and escaped
``trusted.overlay.overlay.*`` xattrs lose one level of escaping.  Unlike the reference it
does not read past the end of a redirect value (its §5.4 quirk).

:mod:`composefs.erofs.dumptext` prints ``composefs-info dump`` straight from an
:class:`Image` without building a Tree, through these public helpers: ``data``, the work
budget (``reset_budget``, ``spend``, ``budget``), ``check_inode``, ``dir_chunks``,
``tree_node``, ``external_xattrs``, ``shared_external``, ``EXTERNAL_XATTRS`` and
``LAYOUTS``.  This module does not import it.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from composefs.erofs import format as fmt
from composefs.erofs.format import BLOCK_SIZE
from composefs.errors import FormatError, UnsupportedVersionError
from composefs.tree import (
    FILE_TYPES,
    INLINE_CONTENT_MAX,
    NAME_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    Inode,
    Tree,
)

PATH_MAX = 4096
# Bytes to test with ``in`` as ints: with a bytes operand, bytes.__contains__ first tries
# it as an int and pays for the TypeError, many times the cost of the search itself.
_SLASH = 0x2F
_NUL = 0
_DIRENT = fmt.DIRENT
_DIRENT_SIZE = fmt.DIRENT.size
_COMPACT = fmt.INODE_COMPACT
_EXTENDED = fmt.INODE_EXTENDED
_XATTR_ENTRY = fmt.XATTR_ENTRY
_U16 = struct.Struct("<H")
_U32 = fmt.XATTR_SHARED_REF
# the data layouts this reader supports (composefs.erofs.dumptext accepts the same)
LAYOUTS = frozenset(
    {fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE, fmt.EROFS_INODE_CHUNK_BASED}
)
_TRUSTED_PREFIX = b"trusted."
# xattrs the reference's reader drops: writer bookkeeping for escaped whiteouts
_DROPPED = frozenset(
    {fmt.OVERLAY_ESCAPED_WHITEOUTS, fmt.USER_OVERLAY_WHITEOUT, fmt.USER_OVERLAY_WHITEOUTS}
)


class ImageInode(NamedTuple):
    """One inode as stored, with the offsets needed to read its xattrs and data."""

    nid: int
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_sec: int
    mtime_nsec: int
    i_u: int  # rdev, block address or chunk format, by type and layout
    layout: int
    xattr_offset: int  # absolute offset of the xattr area; 0 if there is none
    xattr_size: int
    tail_offset: int  # absolute offset of the inline tail

    @property
    def file_type(self) -> int:
        return self.mode & S_IFMT

    @property
    def rdev(self) -> int:
        return self.i_u if self.mode & S_IFMT in (S_IFCHR, S_IFBLK) else 0

    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    def is_stub_whiteout(self) -> bool:
        """A real whiteout (char device 0/0): the root stubs; readers hide them."""
        return self.mode & S_IFMT == S_IFCHR and self.i_u == 0


class Header(NamedTuple):
    """The composefs header and the EROFS superblock fields a reader uses."""

    flags: int
    composefs_version: int
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_offset: int
    xattr_offset: int

    @property
    def has_acl(self) -> bool:
        return bool(self.flags & fmt.COMPOSEFS_FLAGS_HAS_ACL)


Source = str | os.PathLike[str] | bytes | bytearray | memoryview | mmap.mmap | BinaryIO


class Image:
    """A composefs image opened for reading.  Use as a context manager, or ``close()``."""

    def __init__(self, source: Source, *, name: str | None = None) -> None:
        self._mmap: mmap.mmap | None = None
        self.name = name or _source_name(source)
        if isinstance(source, bytes | bytearray | memoryview | mmap.mmap):
            data: bytes | mmap.mmap = bytes(source)
        else:
            if isinstance(source, str | os.PathLike):
                fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = self._map(fd)
                finally:
                    os.close(fd)
            else:
                data = self._map(source.fileno())
        self._data = data
        self.size = len(data)
        self.header = self._read_header()
        # shared xattr entries by index: many inodes refer to one entry, decode it once
        self._shared: dict[int, tuple[bytes, bytes]] = {}
        self.reset_budget()

    def _map(self, fd: int) -> bytes | mmap.mmap:
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        return self._mmap

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def data(self) -> bytes | mmap.mmap:
        """The image's bytes, for code that decodes its structures itself
        (:mod:`composefs.erofs.dumptext`): it must check every offset against ``size``."""
        return self._data

    # -- low level -------------------------------------------------------------------------

    def _error(self, message: str, offset: int | None = None) -> FormatError:
        return FormatError(f"{self.name}: {message}", offset=offset)

    def _read_header(self) -> Header:
        if self.size < BLOCK_SIZE:
            raise self._error(f"image of {self.size} bytes is too small (at least one block)")
        magic, version, flags, cfs_version = fmt.COMPOSEFS_HEADER.unpack_from(self._data, 0)
        if magic != fmt.COMPOSEFS_MAGIC:
            raise self._error("not a composefs image (bad composefs magic)", 0)
        if version != fmt.COMPOSEFS_HEADER_VERSION:
            raise UnsupportedVersionError(
                f"{self.name}: unsupported composefs header version {version}", offset=4
            )
        sb = fmt.SUPERBLOCK.unpack_from(self._data, fmt.EROFS_SUPER_OFFSET)
        (e_magic, _csum, _compat, blkszbits, _ext, root_nid, inos, build_time, build_nsec,
         blocks, meta_blkaddr, xattr_blkaddr) = sb[:12]  # fmt: skip
        if e_magic != fmt.EROFS_SUPER_MAGIC_V1:
            raise self._error("bad EROFS superblock magic", fmt.EROFS_SUPER_OFFSET)
        if blkszbits != fmt.BLOCK_BITS:
            raise self._error(f"unsupported block size 2^{blkszbits}", fmt.EROFS_SUPER_OFFSET + 12)
        meta = meta_blkaddr * BLOCK_SIZE
        xattrs = xattr_blkaddr * BLOCK_SIZE
        if meta >= self.size:
            raise self._error("metadata area starts past the end", fmt.EROFS_SUPER_OFFSET + 40)
        if xattrs >= self.size:
            raise self._error("shared xattr area starts past the end", fmt.EROFS_SUPER_OFFSET + 44)
        if blocks * BLOCK_SIZE > self.size:
            raise self._error(
                f"image is truncated: {self.size} bytes, the superblock says {blocks} blocks",
                fmt.EROFS_SUPER_OFFSET + 36,
            )
        return Header(
            flags, cfs_version, root_nid, inos, build_time, build_nsec, blocks, meta, xattrs
        )

    # -- inodes ----------------------------------------------------------------------------

    @property
    def root(self) -> ImageInode:
        return self.inode(self.header.root_nid)

    def inode(self, nid: int) -> ImageInode:
        """The inode with this nid (bounds-checked, not cached)."""
        offset = self.header.meta_offset + nid * fmt.SLOT_SIZE
        if nid < 0 or offset + _COMPACT.size > self.size:
            raise self._error(f"inode {nid} lies outside the image", offset)
        data = self._data
        i_format = _U16.unpack_from(data, offset)[0]
        if i_format & ~fmt.EROFS_I_ALL:
            raise self._error(f"inode {nid}: unknown format bits {i_format:#x}", offset)
        layout = (i_format >> fmt.EROFS_I_DATALAYOUT_BIT) & fmt.EROFS_I_DATALAYOUT_MASK
        if layout not in LAYOUTS:
            raise self._error(f"inode {nid}: unsupported data layout {layout}", offset)
        if i_format & fmt.EROFS_I_VERSION_MASK:
            if offset + _EXTENDED.size > self.size:
                raise self._error(f"inode {nid} lies outside the image", offset)
            (_f, icount, mode, _r, size, i_u, ino, uid, gid, mtime, mtime_nsec,
             nlink) = _EXTENDED.unpack_from(data, offset)  # fmt: skip
            isize = _EXTENDED.size
        else:
            (_f, icount, mode, nlink, size, _r, i_u, ino, uid, gid,
             _r2) = _COMPACT.unpack_from(data, offset)  # fmt: skip
            mtime = self.header.build_time
            mtime_nsec = self.header.build_time_nsec
            isize = _COMPACT.size
        if icount:
            xattr_size = fmt.XATTR_IBODY_HEADER.size + (icount - 1) * 4
            xattr_offset = offset + isize
        else:
            xattr_size = xattr_offset = 0
        tail_offset = offset + isize + xattr_size
        if tail_offset > self.size:
            raise self._error(f"inode {nid}: xattrs run past the end of the image", offset)
        self.check_inode(nid, mode, layout, size, i_u, tail_offset)
        return ImageInode(
            nid, ino, mode, nlink, uid, gid, size, mtime, mtime_nsec, i_u, layout,
            xattr_offset, xattr_size, tail_offset,
        )  # fmt: skip

    def check_inode(
        self, nid: int, mode: int, layout: int, size: int, i_u: int, tail_offset: int
    ) -> None:
        """What every inode must satisfy before anything else is read through it."""
        ftype = mode & S_IFMT
        if ftype not in FILE_TYPES:
            raise self._error(f"inode {nid}: invalid file type in mode {mode:o}", tail_offset)
        if layout == fmt.EROFS_INODE_CHUNK_BASED:
            if ftype != S_IFREG:
                raise self._error(f"inode {nid}: chunk-based layout on a non-file", tail_offset)
            chunk_format = i_u & 0xFFFF  # the high half may hold a block address (§10.6)
            if chunk_format & ~fmt.EROFS_CHUNK_FORMAT_BLKBITS_MASK:
                raise self._error(
                    f"inode {nid}: unsupported chunk format {chunk_format:#x}", tail_offset
                )
            chunkbits = fmt.BLOCK_BITS + chunk_format
            chunks = -(-size // (1 << chunkbits))
            if tail_offset + 4 * chunks > self.size:
                raise self._error(
                    f"inode {nid}: {chunks} chunk indexes run past the end", tail_offset
                )
        elif layout == fmt.EROFS_INODE_FLAT_INLINE:
            tail = size % BLOCK_SIZE
            if tail and tail_offset % BLOCK_SIZE + tail > BLOCK_SIZE:
                raise self._error(f"inode {nid}: inline data crosses a block boundary", tail_offset)

    # -- data --------------------------------------------------------------------------------

    def _flat_parts(self, ino: ImageInode) -> tuple[int, int, int]:
        """(block offset, bytes in blocks, bytes in the inline tail) of a flat inode."""
        size = ino.size
        if ino.layout == fmt.EROFS_INODE_FLAT_INLINE:
            tail = size % BLOCK_SIZE
            in_blocks = size - tail
        elif ino.layout == fmt.EROFS_INODE_FLAT_PLAIN:
            tail = 0
            in_blocks = size
        else:
            raise self._error(f"inode {ino.nid}: expected a flat data layout", ino.tail_offset)
        start = ino.i_u * BLOCK_SIZE
        if in_blocks and start + in_blocks > self.size:
            raise self._error(f"inode {ino.nid}: data blocks lie outside the image", start)
        if ino.tail_offset + tail > self.size:
            raise self._error(f"inode {ino.nid}: inline data runs past the end", ino.tail_offset)
        return start, in_blocks, tail

    def read_data(self, ino: ImageInode, limit: int) -> bytes:
        """The content stored in the image for a flat inode, refusing more than ``limit``."""
        if ino.size > limit:
            raise self._error(
                f"inode {ino.nid}: stored data of {ino.size} bytes exceeds {limit}",
                ino.tail_offset,
            )
        start, in_blocks, tail = self._flat_parts(ino)
        data = self._data
        return bytes(data[start : start + in_blocks]) + bytes(
            data[ino.tail_offset : ino.tail_offset + tail]
        )

    def readlink(self, ino: ImageInode) -> bytes:
        if ino.mode & S_IFMT != S_IFLNK:
            raise self._error(f"inode {ino.nid} is not a symlink")
        if ino.size >= PATH_MAX:
            raise self._error(f"inode {ino.nid}: symlink of {ino.size} bytes", ino.tail_offset)
        target = self.read_data(ino, PATH_MAX - 1)
        nul = target.find(b"\0")
        if nul >= 0:
            target = target[:nul]
        if not target:
            raise self._error(f"inode {ino.nid}: empty symlink target", ino.tail_offset)
        return target

    # -- directories ---------------------------------------------------------------------------

    def dir_chunks(self, ino: ImageInode) -> list[tuple[int, int]]:
        """(offset, length) of each directory chunk: the blocks, then the inline tail."""
        start, in_blocks, tail = self._flat_parts(ino)
        end = start + in_blocks  # inside the image: at most one entry per block of it
        chunks = [(off, min(BLOCK_SIZE, end - off)) for off in range(start, end, BLOCK_SIZE)]
        if tail:
            chunks.append((ino.tail_offset, tail))
        return chunks

    def _chunk_entries(self, nid: int, off: int, length: int) -> Iterator[tuple[bytes, int, int]]:
        data = self._data
        if length < _DIRENT.size:
            raise self._error(f"directory {nid}: truncated entry block", off)
        first = _U16.unpack_from(data, off + 8)[0]
        if first < _DIRENT.size or first % _DIRENT.size or first > length:
            raise self._error(f"directory {nid}: bad first name offset {first}", off + 8)
        count = first // _DIRENT.size
        records = list(_DIRENT.iter_unpack(data[off : off + first]))
        end = off + length
        for i, (child, nameoff, ftype, _r) in enumerate(records):
            name_start = off + nameoff
            if i + 1 < count:
                name_end = off + records[i + 1][1]
                if not name_start < name_end <= end:
                    raise self._error(f"directory {nid}: bad name offset {nameoff}", off + 12 * i)
                name = data[name_start:name_end]
            else:
                if not name_start < end:
                    raise self._error(f"directory {nid}: bad name offset {nameoff}", off + 12 * i)
                name = data[name_start:end]
                nul = name.find(b"\0")
                if nul >= 0:
                    name = name[:nul]
            if not name or len(name) > NAME_MAX or _SLASH in name or _NUL in name:
                raise self._error(f"directory {nid}: invalid entry name {name!r}", name_start)
            yield name, child, ftype

    def iterdir(self, ino: ImageInode) -> Iterator[tuple[bytes, int, int]]:
        """(name, nid, EROFS file type) of every entry of a directory, ``.`` and ``..`` too."""
        if ino.mode & S_IFMT != S_IFDIR:
            raise self._error(f"inode {ino.nid} is not a directory")
        for off, length in self.dir_chunks(ino):
            yield from self._chunk_entries(ino.nid, off, length)

    def lookup(self, path: bytes | str) -> ImageInode | None:
        """Resolve an absolute path (symlinks are not followed); None if absent.

        Each directory on the way is searched like the kernel does it: its entries are
        sorted, so a binary search in each chunk, stopping at the first chunk whose names
        go past the one wanted.
        """
        if isinstance(path, str):
            path = os.fsencode(path)
        ino = self.root
        for part in path.split(b"/"):
            if not part or part == b".":
                continue
            if ino.mode & S_IFMT != S_IFDIR:
                return None
            nid = self._find(ino, part)
            if nid is None:
                return None
            ino = self.inode(nid)
        return ino

    def _find(self, ino: ImageInode, name: bytes) -> int | None:
        data = self._data
        for off, length in self.dir_chunks(ino):
            if length < _DIRENT.size:
                raise self._error(f"directory {ino.nid}: truncated entry block", off)
            first = _U16.unpack_from(data, off + 8)[0]
            if first < _DIRENT.size or first % _DIRENT.size or first > length:
                raise self._error(f"directory {ino.nid}: bad first name offset {first}", off + 8)
            records = list(_DIRENT.iter_unpack(data[off : off + first]))
            count = len(records)
            end = off + length

            if name > self._name_at(ino.nid, records, count - 1, off, end):
                continue
            lo, hi = 0, count - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                found = self._name_at(ino.nid, records, mid, off, end)
                if found == name:
                    return int(records[mid][0])
                if found < name:
                    lo = mid + 1
                else:
                    hi = mid - 1
            return None
        return None

    def _name_at(
        self, nid: int, records: list[tuple[int, int, int, int]], i: int, off: int, end: int
    ) -> bytes:
        """Name of record ``i`` of a directory chunk at ``off`` ending at ``end``."""
        start = off + records[i][1]
        stop = off + records[i + 1][1] if i + 1 < len(records) else end
        if not start < stop <= end:
            raise self._error(f"directory {nid}: bad name offset", off + 12 * i)
        name = self._data[start:stop]
        if i + 1 == len(records):
            nul = name.find(b"\0")
            if nul >= 0:
                name = name[:nul]
        return name

    # -- xattrs ------------------------------------------------------------------------------

    def raw_xattrs(self, ino: ImageInode) -> list[tuple[bytes, bytes]]:
        """The xattrs as stored: inline entries in order, then the shared ones."""
        if not ino.xattr_offset:
            return []
        return self._raw_xattrs_at(ino.nid, ino.xattr_offset, ino.xattr_size)

    def _raw_xattrs_at(self, nid: int, start: int, size: int) -> list[tuple[bytes, bytes]]:
        data = self._data
        end = start + size
        shared_count = data[start + 4]
        pos = start + fmt.XATTR_IBODY_HEADER.size + 4 * shared_count
        if pos > end:
            raise self._error(f"inode {nid}: {shared_count} shared xattrs overflow", start)
        out: list[tuple[bytes, bytes]] = []
        unpack = _XATTR_ENTRY.unpack_from
        prefixes = fmt.XATTR_INDEX_PREFIXES
        while pos + 4 < end:
            name_len, index, value_size = unpack(data, pos)
            name_start = pos + 4
            value_start = name_start + name_len
            value_end = value_start + value_size
            prefix = prefixes.get(index)
            if prefix is None or value_end > end or (not name_len and not prefix):
                self._xattr_entry(nid, pos, end)  # raises the precise error
            out.append((prefix + data[name_start:value_start], data[value_start:value_end]))  # type: ignore[operator]
            pos += (7 + name_len + value_size) & ~3
        for i in range(shared_count):
            out.append(self._shared_xattr(nid, _U32.unpack_from(data, start + 12 + 4 * i)[0]))
        return out

    def xattrs(self, ino: ImageInode) -> dict[bytes, bytes]:
        """The xattrs a user of the mounted image sees: overlayfs internals removed and
        escaped ``trusted.overlay.*`` names restored (the reference reader's mapping)."""
        return self.to_inode(ino).xattrs

    def backing_file(self, ino: ImageInode) -> tuple[bytes | None, bytes | None]:
        """(object path, fs-verity digest) of an external regular file, each None if absent."""
        node = self.to_inode(ino)
        return node.payload if node.mode & S_IFMT == S_IFREG else None, node.digest

    def _xattr_entry(self, nid: int, pos: int, end: int) -> tuple[bytes, bytes, int]:
        if pos + _XATTR_ENTRY.size > end:
            raise self._error(f"inode {nid}: xattr entry out of bounds", pos)
        name_len, index, value_size = _XATTR_ENTRY.unpack_from(self._data, pos)
        prefix = fmt.XATTR_INDEX_PREFIXES.get(index)
        if prefix is None:
            raise self._error(f"inode {nid}: unknown xattr name index {index}", pos + 1)
        name_start = pos + _XATTR_ENTRY.size
        value_start = name_start + name_len
        value_end = value_start + value_size
        if value_end > end:
            raise self._error(f"inode {nid}: xattr entry overflows its area", pos)
        data = self._data
        key = prefix + data[name_start:value_start]
        if not key or _NUL in key:
            raise self._error(f"inode {nid}: invalid xattr name {key!r}", name_start)
        size = (_XATTR_ENTRY.size + name_len + value_size + 3) & ~3
        return key, bytes(data[value_start:value_end]), size

    # -- whole tree ------------------------------------------------------------------------------

    def to_inode(self, ino: ImageInode) -> Inode:
        """The model inode: stat fields, user-visible xattrs, payload, digest, content."""
        mode = ino.mode
        ftype = mode & S_IFMT
        node = Inode(
            mode, ino.nlink, ino.uid, ino.gid, ino.rdev, ino.size, ino.mtime_sec, ino.mtime_nsec
        )
        if ftype == S_IFLNK:
            node.payload = self.readlink(ino)
        elif ftype == S_IFREG and ino.size:
            if ino.layout == fmt.EROFS_INODE_CHUNK_BASED:
                pass  # external: all holes; the content lives in the object store
            else:
                node.content = self.read_data(ino, min(INLINE_CONTENT_MAX, self.size))
        elif ftype == S_IFDIR and ino.layout == fmt.EROFS_INODE_CHUNK_BASED:
            raise self._error(f"directory {ino.nid} has a chunk-based layout", ino.tail_offset)
        if ino.xattr_offset:
            _map_overlay_xattrs(node, self.raw_xattrs(ino))
        return node

    def to_tree(self, *, filter: Iterable[bytes] | None = None) -> Tree:
        """The whole image as a Tree (the reference's reader semantics, see module doc).

        ``filter`` keeps only these top-level names.  Real whiteouts (the root stubs) are
        left out.  Entries are visited depth-first in on-disk order, like the reference,
        so the first name met of an inode reached under several names is its home; a
        directory is read once, so cycles cannot recurse.
        """
        root_ino = self.root
        if root_ino.mode & S_IFMT != S_IFDIR:
            raise self._error(f"the root inode {root_ino.nid} is not a directory")
        wanted = None if filter is None else set(filter)
        self.reset_budget()
        root = self.to_inode(root_ino)
        tree = Tree(root)
        seen: dict[int, Inode] = {root_ino.nid: root}
        stack = [(root, root_ino.nid, self._tree_entries(root_ino))]
        while stack:
            node, dir_nid, entries = stack[-1]
            for name, nid, off in entries:
                if wanted is not None and node is root and name not in wanted:
                    continue
                child = seen.get(nid)
                descend = None
                if child is None:
                    loaded = self.tree_node(nid)
                    if loaded is None:
                        continue  # a real whiteout: a root stub
                    child, descend = loaded
                    seen[nid] = child
                siblings = node.entries
                assert siblings is not None
                if name in siblings:
                    raise self._error(f"directory {dir_nid}: duplicate entry {name!r}", off)
                siblings[name] = child
                if child.parent is None:
                    child.parent = node
                    child.name = name
                if descend is not None:
                    stack.append((child, nid, self._tree_entries(descend)))
                    break
            else:
                stack.pop()
        return tree

    def regular_files(self) -> Iterator[tuple[ImageInode, bytes | None]]:
        """Every regular file, once (a hardlinked one at its first name), with the object
        holding its content (``XX/<62 hex>``, the redirect without its ``/``; None for
        content inline and empty files): what :meth:`to_tree` would give, walking the tree
        the same way without building it, for object listings (gc, stats) in half the
        time.  Directories are read once, so cycles cannot recurse."""
        root = self.root
        if root.mode & S_IFMT != S_IFDIR:
            raise self._error(f"the root inode {root.nid} is not a directory")
        seen = {root.nid}
        stack = [root]
        while stack:
            for name, nid, _ftype in self.iterdir(stack.pop()):
                if nid in seen or name == b"." or name == b"..":
                    continue
                seen.add(nid)
                ino = self.inode(nid)  # its own mode decides, whatever the entry says
                ftype = ino.mode & S_IFMT
                if ftype == S_IFDIR:
                    stack.append(ino)
                    continue
                if ftype != S_IFREG:
                    continue
                external = ino.layout == fmt.EROFS_INODE_CHUNK_BASED and ino.size > 0
                if not ino.xattr_offset:
                    yield ino, None
                    continue
                fast = self.external_xattrs(
                    nid, ino.xattr_offset, ino.xattr_offset + ino.xattr_size
                )
                if fast is not None:
                    yield ino, fast[0] if external else None
                    continue
                node = self.to_inode(ino)  # any other xattrs: maybe an escaped whiteout
                if node.mode & S_IFMT == S_IFREG:
                    payload = node.payload.lstrip(b"/") if node.payload else None
                    yield ino, payload if external else None

    # -- the work budget of a whole-image walk ---------------------------------------------------

    def reset_budget(self) -> None:
        """Start a whole-image walk (:meth:`to_tree`, :mod:`composefs.erofs.dumptext`).

        Everything materialised is bounded by the image: in a valid image each byte of
        directory data, inline xattrs and inline content belongs to one inode, so needing
        more than that means overlapping structures built to multiply the work.
        """
        self.budget = 2 * self.size

    def spend(self, amount: int, where: int) -> None:
        """Take ``amount`` from :attr:`budget`; FormatError (at ``where``) when it runs out."""
        self.budget -= amount
        if self.budget < 0:
            raise self._error("image structures overlap (more data than the image holds)", where)

    def tree_node(self, nid: int) -> tuple[Inode, ImageInode | None] | None:
        """The model inode for ``nid`` (and, for a directory, its ImageInode), or None for a
        root stub.  :meth:`inode` and :meth:`to_inode` fused for speed in :meth:`to_tree`;
        spends from the budget as :meth:`to_tree` does."""
        data = self._data
        header = self.header
        offset = header.meta_offset + nid * 32
        if nid < 0 or offset + 32 > self.size:
            raise self._error(f"inode {nid} lies outside the image", offset)
        i_format = data[offset] | data[offset + 1] << 8
        layout = i_format >> 1
        if i_format & 1:
            if offset + 64 > self.size or i_format & ~fmt.EROFS_I_ALL or layout not in LAYOUTS:
                return self._tree_node_slow(nid)
            (_f, icount, mode, _r, size, i_u, _ino, uid, gid, mtime, mtime_nsec,
             nlink) = _EXTENDED.unpack_from(data, offset)  # fmt: skip
            tail_offset = offset + 64
        else:
            if i_format & ~fmt.EROFS_I_ALL or layout not in LAYOUTS:
                return self._tree_node_slow(nid)
            (_f, icount, mode, nlink, size, _r, i_u, _ino, uid, gid,
             _r2) = _COMPACT.unpack_from(data, offset)  # fmt: skip
            mtime = header.build_time
            mtime_nsec = header.build_time_nsec
            tail_offset = offset + 32
        ftype = mode & S_IFMT
        xattr_offset = tail_offset
        if icount:
            tail_offset += 8 + icount * 4  # 12 + (icount - 1) * 4
            if tail_offset > self.size:
                return self._tree_node_slow(nid)
        if layout or ftype not in FILE_TYPES:
            self.check_inode(nid, mode, layout, size, i_u, tail_offset)
        if ftype in (S_IFCHR, S_IFBLK):
            if i_u == 0 and ftype == S_IFCHR:
                return None
            rdev = i_u
        else:
            rdev = 0
        node = Inode(mode, nlink, uid, gid, rdev, size, mtime, mtime_nsec)
        info = None
        if ftype in (S_IFDIR, S_IFLNK) or (ftype == S_IFREG and size and layout != 4):
            info = ImageInode(
                nid, _ino, mode, nlink, uid, gid, size, mtime, mtime_nsec, i_u, layout,
                xattr_offset if icount else 0, tail_offset - xattr_offset, tail_offset,
            )  # fmt: skip
            if ftype == S_IFLNK:
                self.spend(size, tail_offset)
                node.payload = self.readlink(info)
                info = None
            elif ftype == S_IFREG:
                self.spend(size, tail_offset)
                node.content = self.read_data(info, min(INLINE_CONTENT_MAX, self.size))
                info = None
            elif layout == fmt.EROFS_INODE_CHUNK_BASED:
                raise self._error(f"directory {nid} has a chunk-based layout", tail_offset)
        if icount:
            self.spend(tail_offset - xattr_offset, xattr_offset)
            external = (
                self.external_xattrs(nid, xattr_offset, tail_offset) if ftype == S_IFREG else None
            )
            if external is not None:
                node.payload, node.digest = external
            else:
                _map_overlay_xattrs(
                    node, self._raw_xattrs_at(nid, xattr_offset, tail_offset - xattr_offset)
                )
        return node, info

    def external_xattrs(self, nid: int, start: int, end: int) -> tuple[bytes, bytes | None] | None:
        """Fast path for the xattr area the writer gives an external file: its metacopy
        and its redirect, each inline or a shared reference (several files with the same
        content share both), nothing else.  Returns (payload, digest), or None for any
        other area, which the careful path then reads."""
        data = self._data
        m = EXTERNAL_XATTRS.fullmatch(data, start, end)
        if m is not None:  # the common forms, in one step
            digest, ref, size, value, refs = m.groups()
            if refs is None and len(value) + 1 != size[0] | size[1] << 8:
                return None
            if ref or refs:
                shared = self.shared_external(nid, ref or refs)
                if shared is None:
                    return None
                digest = shared[0]
                if refs:
                    value = shared[1]
            return value, digest
        shared_count = data[start + 4]
        p = start + 12 + 4 * shared_count
        if p > end or shared_count > 2:
            return None
        metacopy: bytes | None = None
        redirect: bytes | None = None
        for i in range(shared_count):
            key, value = self._shared_xattr(nid, _U32.unpack_from(data, start + 12 + 4 * i)[0])
            if key == fmt.OVERLAY_METACOPY and metacopy is None:
                metacopy = value
            elif key == fmt.OVERLAY_REDIRECT and redirect is None:
                redirect = value
            else:
                return None
        # the inline entries come first, but the two keys do not depend on each other
        if metacopy is None:
            if data[p : p + 24] == _METACOPY_PREFIX:
                metacopy = data[p + 20 : p + 56]
                p += 56
            elif data[p : p + 20] == _METACOPY_ENTRY:
                metacopy = b""
                p += 20
            else:
                return None
        if redirect is None:
            if p + 20 > end or data[p : p + 2] != _REDIRECT_PREFIX:
                return None
            if data[p + 4 : p + 20] != _REDIRECT_SUFFIX:
                return None
            size = data[p + 2] | data[p + 3] << 8
            redirect = data[p + 20 : p + 20 + size]
            p = (p + 20 + size + 3) & ~3
        if p != end or len(redirect) < 2 or redirect[0] != _SLASH or _NUL in redirect:
            return None
        digest = metacopy[4:] if len(metacopy) == fmt.METACOPY_SIZE else None
        return redirect[1:], digest

    def shared_external(self, nid: int, refs: bytes) -> tuple[bytes | None, bytes] | None:
        """(digest, payload) of an external file's shared xattrs, ``refs`` their raw 4-byte
        references: one metacopy, or a metacopy and a redirect (``b""`` for the payload
        when there is no redirect).  None for any other set."""
        digest = payload = None
        metacopy = False
        for i in range(0, len(refs), 4):
            key, value = self._shared_xattr(nid, int.from_bytes(refs[i : i + 4], "little"))
            if key == fmt.OVERLAY_METACOPY and not metacopy:
                metacopy = True
                digest = value[4:] if len(value) == fmt.METACOPY_SIZE else None
            elif key == fmt.OVERLAY_REDIRECT and payload is None:
                if len(value) < 2 or value[0] != _SLASH or _NUL in value:
                    return None
                payload = value[1:]
            else:
                return None
        if not metacopy or (payload is None) != (len(refs) == 4):
            return None
        return digest, payload or b""

    def _shared_xattr(self, nid: int, idx: int) -> tuple[bytes, bytes]:
        """Shared xattr entry ``idx`` (decoded once: many inodes refer to one entry)."""
        pair = self._shared.get(idx)
        if pair is None:
            key, value, _size = self._xattr_entry(
                nid, self.header.xattr_offset + 4 * idx, self.size
            )
            pair = self._shared[idx] = (key, value)
        return pair

    def _tree_node_slow(self, nid: int) -> tuple[Inode, ImageInode | None] | None:
        ino = self.inode(nid)  # raises the precise error
        raise self._error(f"inode {nid}: unreadable", ino.tail_offset)  # pragma: no cover

    def _tree_entries(self, ino: ImageInode) -> Iterator[tuple[bytes, int, int]]:
        for off, length in self.dir_chunks(ino):
            self.spend(length, off)
            for name, nid, _ftype in self._chunk_entries(ino.nid, off, length):
                if name != b"." and name != b"..":
                    yield name, nid, off


_METACOPY_ENTRY = _XATTR_ENTRY.pack(16, fmt.EROFS_XATTR_INDEX_TRUSTED, 0) + b"overlay.metacopy"
_METACOPY_PREFIX = (
    _XATTR_ENTRY.pack(16, fmt.EROFS_XATTR_INDEX_TRUSTED, fmt.METACOPY_SIZE)
    + b"overlay.metacopy"
    + fmt.METACOPY_HEADER.pack(0, fmt.METACOPY_SIZE, 0, fmt.FS_VERITY_HASH_ALG_SHA256)
)
_REDIRECT_PREFIX = bytes([16, fmt.EROFS_XATTR_INDEX_TRUSTED])
_REDIRECT_SUFFIX = b"overlay.redirect"
# The xattr areas the writer gives external files: the header, then either no shared
# reference and an inline metacopy (with a digest or none), or one shared reference (the
# metacopy: many files have none, or the same digest), then the inline redirect "/" +
# payload and zero padding (a payload printed as it is, without escapes; its length must
# match); or two shared references, the metacopy and the redirect (files with the same
# content).  Groups: inline digest, one reference, redirect size, payload, two references.
EXTERNAL_XATTRS = re.compile(
    rb"....(?:\x00.{7}(?:%b|%b(.{32}))|\x01.{7}(....))%b(..)%b/([!-\[\]-~]+)\x00{0,3}"
    rb"|....\x02.{7}(.{8})"
    % (
        re.escape(_METACOPY_ENTRY),
        re.escape(_METACOPY_PREFIX),
        re.escape(_REDIRECT_PREFIX),
        re.escape(_REDIRECT_SUFFIX),
    ),
    re.DOTALL,
)


def _map_overlay_xattrs(node: Inode, raw: list[tuple[bytes, bytes]]) -> None:
    """Undo the writer's overlayfs rewrite on one inode's stored xattrs (dumpfile.md §5.3)."""
    xattrs = node.xattrs
    for key, value in raw:
        if key.startswith(fmt.OVERLAY_PREFIX):
            ftype = node.mode & S_IFMT
            if key == fmt.OVERLAY_REDIRECT:
                if ftype == S_IFREG:
                    payload = value[1:] if len(value) > 1 and value[:1] == b"/" else value
                    nul = payload.find(b"\0")
                    node.payload = payload if nul < 0 else payload[:nul]
                continue
            if key == fmt.OVERLAY_METACOPY:
                if ftype == S_IFREG and len(value) == fmt.METACOPY_SIZE:
                    node.digest = value[4:]
                continue
            if key == fmt.OVERLAY_ESCAPED_WHITEOUT and ftype == S_IFREG:
                node.mode = (node.mode & ~S_IFMT) | S_IFCHR
                node.rdev = 0
                node.size = 0
                node.content = None
                continue
            if key in _DROPPED:
                continue
            if not key.startswith(fmt.OVERLAY_ESCAPED_PREFIX):
                continue  # the writer's own markers, e.g. the root's opaque=y
            key = fmt.OVERLAY_PREFIX + key[len(fmt.OVERLAY_ESCAPED_PREFIX) :]
        elif key in _DROPPED:
            continue
        xattrs.pop(key, None)  # a repeated key moves to the end, as in the reference
        xattrs[key] = value


def _source_name(source: Source) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<image>"


def load_tree(source: Source, *, filter: Iterable[bytes] | None = None) -> Tree:
    """Read a whole image into a Tree."""
    with Image(source) as image:
        return image.to_tree(filter=filter)
