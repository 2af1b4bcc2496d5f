"""Image -> dump text without building a Tree: the fast path of ``composefs-info dump``.

:func:`dump_text` gives the composefs-dump(5) text of an image, the same bytes as
``dumpfile.iter_lines(image.to_tree(filter=filter))`` and the same errors, but for the
images writers make it prints straight from the image: building the Tree and walking it
again costs more than the reading itself.

When the fast path applies: every directory's entries are in strictly increasing name
order, no directory is reached twice (no cycle, no hardlinked directory), and the output
stays in proportion to the image.  Then the on-disk depth-first order, which decides the
home name of an inode reached under several names, is also the order the dump prints, so
each line can be printed as its entry is met: the first name of an inode gets its line,
each later name the hardlink line (``@`` and the path of the first).

How it reads: directories a chunk at a time (:func:`_fast_listing`), with the checks of
:meth:`Image.iterdir` on whole chunks; external files (a compact chunk-based inode whose
xattr area :data:`~composefs.erofs.reader.EXTERNAL_XATTRS` matches: a metacopy and a
redirect, inline or shared) decoded in the loop of :func:`_fast_dump`; the other external
files, and directories, symlinks and empty files without xattrs, by :func:`_fast_node`;
any other inode by the careful :meth:`Image.tree_node`, whose
:class:`~composefs.tree.Inode` is printed with :func:`dumpfile.node_fields`, as
``iter_lines`` prints it.

How it falls back: the output is buffered, and anything else (unsorted names, a directory
met twice, a name or inode that fails a check, any :class:`FormatError`, a work budget
running out) abandons it; the careful path (:meth:`Image.to_tree`, then
:func:`dumpfile.iter_lines`) then runs from the start and prints the same text or raises
the precise error.

Why the output is identical: the line pieces come from :func:`dumpfile.node_fields`, or are
formatted the same way where the loop builds them itself; every inode goes through the
checks of the careful path (:meth:`Image.check_inode`, the reader's external-xattr
decoding, the reader's limits on names), and the same work budget
(:meth:`Image.reset_budget`) is spent the same way, so what the careful path would reject
makes the fast path give up rather than print.  ``tests/mutate_images.py`` holds the two
paths to the same text, or the same error, on every mutant image.

This module reads the image through :class:`~composefs.erofs.reader.Image` and prints with
:mod:`composefs.dumpfile`; the reader does not depend on it.
"""

from __future__ import annotations

import functools
import struct
from bisect import bisect_left
from collections.abc import Iterable
from operator import lt as _lt

from composefs.dumpfile import FIELD_SAFE, escape, escape_optional, iter_lines, node_fields
from composefs.erofs import format as fmt
from composefs.erofs.reader import EXTERNAL_XATTRS, LAYOUTS, Image, ImageInode
from composefs.errors import FormatError
from composefs.tree import NAME_MAX, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG

_COMPACT = fmt.INODE_COMPACT
_EXTENDED = fmt.INODE_EXTENDED
_DIRENT_SIZE = fmt.DIRENT.size
_COMPACT_CHUNK_BASED = fmt.EROFS_INODE_CHUNK_BASED << fmt.EROFS_I_DATALAYOUT_BIT
_DIR_OR_LINK = (S_IFDIR, S_IFLNK)
_DOTS = [b".", b".."]
_NO_DIGEST = b" - -\n"  # the end of a line without CONTENT, DIGEST and xattrs
# i_format of the inodes _fast_node decodes: compact or extended, any data layout
_FAST_FORMATS = frozenset(v << 1 | e for v in LAYOUTS for e in (0, 1))


class _Declined(Exception):
    """Internal: :func:`_fast_dump` leaves this image to the careful path."""


@functools.cache
def _dirents(count: int) -> struct.Struct:
    """(nid, name offset) of ``count`` directory records, the file types skipped."""
    return struct.Struct("<" + "QH2x" * count)


def dump_text(image: Image, *, filter: Iterable[bytes] | None = None) -> Iterable[bytes]:
    """The composefs-dump(5) text of the image: the same bytes as
    ``dumpfile.iter_lines(image.to_tree(filter=filter))``, and the same errors.

    A fast path prints straight from the image, without a Tree, when the image is as
    writers make it: every directory's entries in strictly increasing name order (so
    the on-disk depth-first order that decides which name of an inode is its home is
    also the dump's name order), no directory reached twice, output in proportion to
    the image.  It buffers its output; on anything else, errors included, it gives up
    and the careful path (a Tree, then its dump) runs from the start: it then prints the
    same text, or raises the precise error.
    """
    try:
        return _fast_dump(image, None if filter is None else set(filter))
    except (_Declined, FormatError):
        pass
    return iter_lines(image.to_tree(filter=filter))


def _fast_dump(image: Image, wanted: set[bytes] | None) -> list[bytes]:
    root_ino = image.root
    if root_ino.mode & S_IFMT != S_IFDIR:
        raise _Declined
    image.reset_budget()  # the work budget of to_tree, spent the same way
    # What the output may hold beyond what the budget bounds: every line repeats its
    # directory's path, which a deep image could make quadratic; the careful path
    # streams its output instead.
    path_budget = 8 * image.size + (1 << 20)
    data = image.data
    size = image.size
    meta = image.header.meta_offset
    build_time = image.header.build_time
    build_nsec = image.header.build_time_nsec
    unpack = _COMPACT.unpack_from
    match_external = EXTERNAL_XATTRS.fullmatch
    # shared_external of each set of shared references met
    externals: dict[bytes, tuple[bytes | None, bytes]] = {}
    # "MODE NLINK UID GID RDEV MTIME " is shared by most files of an image
    mids: dict[tuple[int, int, int, int, int, int], bytes] = {}
    out: list[bytes] = [b"/", *node_fields(image.to_inode(root_ino))]
    # nid -> pieces of the line of its first name, for hardlink lines; () for directories
    seen: dict[int, tuple[bytes, ...]] = {root_ino.nid: ()}
    seen_get = seen.get
    # directories being listed: (escaped path with a trailing "/", entries left)
    names, nids = _fast_listing(image, root_ino, wanted)
    stack = [(b"/", zip(names, nids, strict=True))]
    while stack:
        prefix, entries = stack[-1]
        for name, nid in entries:
            first = seen_get(nid)
            if first is not None:
                if not first:
                    raise _Declined  # a directory met again: a cycle or a hardlink
                # a later name of an inode: the hardlink line
                _p, _n, head, mid, tail = first
                out += (prefix, name, head, b"@", mid, _p + _n, tail)
                continue
            # Most entries of an image are external files: a compact chunk-based inode
            # whose xattr area EXTERNAL_XATTRS matches.  They are decoded right here;
            # any other inode, or one that fails a check, goes to _fast_node.
            off = meta + nid * 32
            if off + 64 <= size:
                (i_format, icount, mode, nlink, fsize, _r, i_u, _i, uid, gid,
                 _r2) = unpack(data, off)  # fmt: skip
                end = off + 40 + icount * 4
                chunk_format = i_u & 0xFFFF
                if (
                    i_format == _COMPACT_CHUNK_BASED
                    and mode & S_IFMT == S_IFREG
                    and icount
                    and end <= size
                    # Image.check_inode's chunk checks, written out: this runs for most
                    # entries of an image, and a failing inode goes on to _fast_node,
                    # which calls check_inode itself
                    and chunk_format <= fmt.EROFS_CHUNK_FORMAT_BLKBITS_MASK
                    and end - (-fsize >> (fmt.BLOCK_BITS + chunk_format)) * 4 <= size
                ):
                    m = match_external(data, off + 32, end)
                    if m is not None:
                        digest: bytes | None
                        digest, ref, rsize, payload, refs = m.groups()
                        ok = rsize is None or len(payload) + 1 == rsize[0] | rsize[1] << 8
                        ref = ref or refs
                        if ok and ref:
                            shared = externals.get(ref)
                            if shared is None:
                                shared = image.shared_external(nid, ref)
                                if shared is None:
                                    ok = False  # _fast_node tells what it is
                                else:
                                    externals[ref] = shared
                            if shared is not None:
                                digest = shared[0]
                                if refs:
                                    payload = shared[1]
                        if ok:
                            # Image.spend, written out; the careful path reports running out
                            image.budget -= end - off - 32
                            if image.budget < 0:
                                raise _Declined
                            key = (mode, nlink, uid, gid, build_time, build_nsec)
                            mid = mids.get(key, b"")
                            if not mid:
                                mid = mids[key] = b"%o %d %d %d 0 %d.%d " % key
                            head = b" %d " % fsize
                            tail = (
                                _NO_DIGEST if digest is None else b" - %b\n" % digest.hex().encode()
                            )
                            seen[nid] = (prefix, name, head, mid, tail)
                            if refs or payload == b"-":  # else it needs no escapes
                                payload = escape_optional(payload)
                            out += (prefix, name, head, mid, payload, tail)
                            continue
            fields = _fast_node(image, nid, mids)
            if fields is None:
                loaded = image.tree_node(nid)  # any other inode, the careful way
                if loaded is None:
                    continue  # a real whiteout: a root stub
                node, descend = loaded
                head, mid, payload, tail = node_fields(node)
            else:
                head, mid, payload, tail, descend = fields
            out += (prefix, name, head, mid, payload, tail)
            if descend is None:
                seen[nid] = (prefix, name, head, mid, tail)
                continue
            seen[nid] = ()
            path = prefix + name + b"/"
            names, nids = _fast_listing(image, descend, None)
            path_budget -= len(path) * len(names)
            if path_budget < 0:
                raise _Declined
            stack.append((path, zip(names, nids, strict=True)))
            break
        else:
            stack.pop()
    return [b"".join(out)]


def _fast_node(
    image: Image, nid: int, mids: dict[tuple[int, int, int, int, int, int], bytes]
) -> tuple[bytes, bytes, bytes, bytes, ImageInode | None] | None:
    """For :func:`_fast_dump`, the line pieces of :func:`dumpfile.node_fields` (and the
    ImageInode of a directory) straight from the image, for the inodes writers make
    most: external files, empty files, directories and symlinks without xattrs.  None for any
    other inode, left to :meth:`Image.tree_node`.  The checks are those of
    :meth:`Image.tree_node`, the work spent the same."""
    data = image.data
    off = image.header.meta_offset + nid * 32
    if off + 64 > image.size:
        return None
    i_format = data[off] | data[off + 1] << 8
    if i_format not in _FAST_FORMATS:
        return None
    if i_format & 1:
        (_f, icount, mode, _r, size, i_u, ino, uid, gid, mtime, nsec,
         nlink) = _EXTENDED.unpack_from(data, off)  # fmt: skip
        xattr_offset = off + 64
    else:
        (_f, icount, mode, nlink, size, _r, i_u, ino, uid, gid,
         _r2) = _COMPACT.unpack_from(data, off)  # fmt: skip
        mtime = image.header.build_time
        nsec = image.header.build_time_nsec
        xattr_offset = off + 32
    end = xattr_offset + 8 + icount * 4 if icount else xattr_offset
    if end > image.size:
        return None
    layout = i_format >> 1
    ftype = mode & S_IFMT
    if ftype == S_IFREG:
        if layout == fmt.EROFS_INODE_CHUNK_BASED and icount:
            image.check_inode(nid, mode, layout, size, i_u, end)
            external = image.external_xattrs(nid, xattr_offset, end)
            if external is None:
                return None
            image.spend(end - xattr_offset, xattr_offset)
            payload, digest = external
            tail = _NO_DIGEST if digest is None else b" - %b\n" % digest.hex().encode()
            payload = escape_optional(payload)
        elif not size and not icount:
            payload = b"-"
            tail = _NO_DIGEST
        else:
            return None
        info = None
    elif ftype in _DIR_OR_LINK and not icount and layout != fmt.EROFS_INODE_CHUNK_BASED:
        if layout:
            image.check_inode(nid, mode, layout, size, i_u, end)
        info = ImageInode._make(
            (nid, ino, mode, nlink, uid, gid, size, mtime, nsec, i_u, layout, 0, 0, end)
        )
        payload = b"-"
        if ftype == S_IFLNK:
            image.spend(size, end)
            payload = escape_optional(image.readlink(info))
            info = None
        tail = _NO_DIGEST
    else:
        return None
    key = (mode, nlink, uid, gid, mtime, nsec)
    mid = mids.get(key)
    if mid is None:
        mid = mids[key] = b"%o %d %d %d 0 %d.%d " % key
    return b" %d " % size, mid, payload, tail, info


def _fast_listing(
    image: Image, ino: ImageInode, wanted: set[bytes] | None
) -> tuple[list[bytes], list[int]]:
    """Escaped names and nids of a directory's entries but ``.`` and ``..``, for
    :func:`_fast_dump`: the checks of :meth:`Image.iterdir` on whole chunks at once,
    and the names must be in strictly increasing order."""
    data = image.data
    names: list[bytes] = []
    nids: list[int] = []
    escaping = False
    for off, length in image.dir_chunks(ino):
        image.spend(length, off)
        block = data[off : off + length]
        first = block[8] | block[9] << 8 if length >= _DIRENT_SIZE else 0
        if first < _DIRENT_SIZE or first % _DIRENT_SIZE or first > length:
            raise _Declined
        records = _dirents(first // _DIRENT_SIZE).unpack_from(block)
        starts = records[1::2]
        chunk_names = [block[a:b] for a, b in zip(starts, (*starts[1:], length), strict=True)]
        # no name is empty iff the offsets increase and stay inside the chunk
        if not all(chunk_names):
            raise _Declined
        last = chunk_names[-1]
        nul = last.find(b"\0")
        if nul >= 0:
            chunk_names[-1] = last = last[:nul]
        # all the names, one after the other; "/" and NUL tested as ints (a one-byte bytes
        # operand makes `in` try it as an int first and clear a TypeError)
        text = block[first : starts[-1] + len(last)]
        if not last or 0x2F in text or 0 in text:
            raise _Declined
        if len(text) > NAME_MAX and max(map(len, chunk_names)) > NAME_MAX:
            raise _Declined
        escaping = escaping or bool(text.translate(None, FIELD_SAFE))
        names += chunk_names
        nids += records[::2]
    if not all(map(_lt, names, names[1:])):
        raise _Declined
    # sorted, so at most one of each: first, unless some name sorts before "."
    if names[:2] == _DOTS:
        del names[:2], nids[:2]
    else:
        for dot in _DOTS:
            i = bisect_left(names, dot)
            if i < len(names) and names[i] == dot:
                del names[i], nids[i]
    if wanted is not None:
        kept = [i for i, name in enumerate(names) if name in wanted]
        names = [names[i] for i in kept]
        nids = [nids[i] for i in kept]
    if escaping:
        names = [escape(name) for name in names]
    return names, nids
