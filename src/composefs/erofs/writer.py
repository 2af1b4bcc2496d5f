"""Tree -> composefs image, byte-identical to the reference ``mkcomposefs`` 1.0.8.

The rules are those of ``docs/format.md`` of the project specs; section numbers in the
comments refer to it.  The pipeline:

1. pick the format version (§4);
2. number the inodes breadth-first, skipping hardlink entries (§6.1), and rewrite each
   inode for overlayfs on the way (§5): escape ``trusted.overlay.*``, add metacopy and
   redirect to external files, escape whiteouts, add ``.``/``..``, the root's opaque
   marker and the 256 root whiteout stubs;
3. build the shared xattr table (§7.4);
4. decide each inode's data layout and form, then place inodes, padding as the reference
   does (§8, §9);
5. pack everything into one preallocated buffer (§10, §11).

The input tree is never modified: the writer keeps its rewritten view in ``_Node`` records.
The loops are written for speed (locals, no per-byte work): a 64k-inode tree is laid out
in well under a second.
"""

from __future__ import annotations

import errno
import gc
from collections import Counter

import xxhash

from composefs.erofs import format as fmt
from composefs.erofs.format import BLOCK_SIZE, round_up
from composefs.errors import TreeError
from composefs.tree import (
    DIGEST_SIZE,
    FILE_TYPES,
    INLINE_CONTENT_MAX,
    PAYLOAD_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    XATTR_BUDGET,
    XATTR_ENTRY_OVERHEAD,
    XATTR_HEADER_OVERHEAD,
    Inode,
    Tree,
)

U64 = (1 << 64) - 1
MAX_CHUNKS = 1024  # the reference keeps a chunk index array within one block
HALF_BLOCK = BLOCK_SIZE // 2
_STUB_NAMES = [b"%02x" % i for i in range(256)]
_FTYPE = {
    S_IFREG: fmt.EROFS_FT_REG_FILE,
    S_IFDIR: fmt.EROFS_FT_DIR,
    S_IFCHR: fmt.EROFS_FT_CHRDEV,
    S_IFBLK: fmt.EROFS_FT_BLKDEV,
    S_IFIFO: fmt.EROFS_FT_FIFO,
    S_IFSOCK: fmt.EROFS_FT_SOCK,
    S_IFLNK: fmt.EROFS_FT_SYMLINK,
}
# What an inode's data is, once rewritten (decides §8 and §10.6).
KIND_OTHER = 0  # devices, FIFOs, sockets: no data
KIND_DIR = 1
KIND_INLINE = 2  # regular file with embedded content, or empty
KIND_EXTERNAL = 3  # regular file backed by an object: chunk-based, all holes
KIND_SYMLINK = 4
# Files up to this size are one chunk (below the 43-bit chunk size limit, §8.3).
_PLAIN_SIZE_MAX = 1 << 43
_METACOPY_HEADER = fmt.METACOPY_HEADER.pack(0, fmt.METACOPY_SIZE, 0, fmt.FS_VERITY_HASH_ALG_SHA256)


class _Node:
    """One inode as the writer sees it after the overlayfs rewrite."""

    __slots__ = (
        "chunkbits",
        "dirents",
        "inode",
        "kind",
        "mode",
        "n_blocks",
        "name",
        "nid",
        "nlink",
        "parent",
        "plain_external",
        "size",
        "split",
        "tail",
        "xattr_budget",
        "xattrs",
    )

    inode: Inode
    name: bytes
    parent: _Node
    plain_external: bool  # external file whose only xattrs are metacopy and redirect
    kind: int
    mode: int
    size: int
    nlink: int
    xattrs: dict[bytes, bytes]
    xattr_budget: int
    chunkbits: int
    dirents: list[tuple[bytes, _Node]]
    split: list[int]
    n_blocks: int
    tail: int
    nid: int

    def path(self) -> bytes:
        """The node's absolute path, for error messages."""
        names = []
        node = self
        while node.name != b"/":
            names.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(names))

    def set_xattr(self, key: bytes, value: bytes) -> None:
        """Add or replace an xattr, with the reference's budget check (§5.8).

        The reference's copy of the tree starts every inode's budget counter at 0 even when
        the inode already has xattrs; replacing one of those can therefore drive the
        (unsigned) counter below zero, which then fails.  Emulated for error compatibility.
        """
        xattrs = self.xattrs
        if xattrs is self.inode.xattrs:
            xattrs = self.xattrs = dict(xattrs)  # copy on first write
        old = xattrs.pop(key, None)
        if old is not None:
            if xattrs:
                self.xattr_budget -= XATTR_ENTRY_OVERHEAD + len(key) + len(old)
            else:
                self.xattr_budget = 0
        entry = XATTR_ENTRY_OVERHEAD + len(key) + len(value)
        if not xattrs:
            entry += XATTR_HEADER_OVERHEAD
        if (self.xattr_budget + entry) & U64 > XATTR_BUDGET:
            raise TreeError(errno.ERANGE, f"cannot add xattr {key.decode()}", self.path())
        self.xattr_budget += entry
        xattrs[key] = value


class _Versioning:
    """§4: the format version, bumped to 1 at the first whiteout when that is allowed.

    Only whiteouts depend on the version, so deciding at the first one met is the same as
    the reference's separate walk over the tree beforehand.
    """

    __slots__ = ("may_bump", "version")

    def __init__(self, min_version: int, max_version: int) -> None:
        for v in (min_version, max_version):
            if not 0 <= v <= fmt.COMPOSEFS_VERSION_MAX:
                raise TreeError(errno.EINVAL, f"unsupported format version {v}")
        self.version = min_version
        self.may_bump = min_version < 1 <= max(max_version, min_version)

    def for_whiteout(self) -> int:
        if self.may_bump:
            self.version = 1
            self.may_bump = False
        return self.version


def _metacopy_value(digest: bytes | None) -> bytes:
    """§5.3: ``trusted.overlay.metacopy``: empty, or the header and the fs-verity digest."""
    return b"" if digest is None else _METACOPY_HEADER + digest


def _escaped(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """§5.2: ``trusted.overlay.X`` becomes ``trusted.overlay.overlay.X``; nothing else."""
    prefix = fmt.OVERLAY_PREFIX
    for k in xattrs:
        if k.startswith(prefix):
            break
    else:
        return xattrs  # shared with the input inode; copied before any change
    cut = len(prefix)
    escaped = fmt.OVERLAY_ESCAPED_PREFIX
    return {(escaped + k[cut:] if k.startswith(prefix) else k): v for k, v in xattrs.items()}


def _check_content(inode: Inode, n: _Node) -> None:
    """What the reference's node validation refuses (the dump parser already did most).

    ``0 in payload`` looks for a NUL byte; unlike ``b"\\0" in payload`` it does not raise
    and clear a TypeError internally, which matters once per file.
    """
    payload = inode.payload
    if payload is not None and (len(payload) > PAYLOAD_MAX or 0 in payload):
        raise TreeError(errno.ENAMETOOLONG, "payload too long", n.path())
    content = inode.content
    if content is not None:
        if len(content) > INLINE_CONTENT_MAX:
            raise TreeError(errno.EINVAL, "inline content too large", n.path())
        if len(content) != inode.size:
            raise TreeError(errno.EINVAL, "content length differs from size", n.path())
    digest = inode.digest
    if digest is not None and len(digest) != DIGEST_SIZE:
        raise TreeError(errno.EINVAL, "digest must be 32 bytes", n.path())


def _make_node(
    inode: Inode, name: bytes, parent: _Node | None, versioning: _Versioning | None
) -> _Node:
    """A writer node for ``inode`` with the §5 rewrite applied (§5.1-§5.4)."""
    n = _Node()
    n.inode = inode
    n.name = name
    if parent is not None:
        n.parent = parent
    n.xattr_budget = 0
    n.plain_external = False
    xattrs = inode.xattrs
    if xattrs:
        xattrs = _escaped(xattrs)
    n.xattrs = xattrs
    mode = inode.mode
    ftype = mode & S_IFMT
    size = inode.size
    n.mode = mode
    n.size = size
    n.nlink = inode.nlink
    if ftype == S_IFREG:
        if inode.content is not None or inode.digest is not None or inode.payload is not None:
            _check_content(inode, n)
        if size > 0 and not inode.content:
            chunkbits = max((size - 1).bit_length(), fmt.BLOCK_BITS)
            if chunkbits > 43:
                chunkbits = 43  # §8.3: the chunk format field has 5 bits
            if -(-size // (1 << chunkbits)) > MAX_CHUNKS:
                raise TreeError(errno.EFBIG, path=n.path())
            n.chunkbits = chunkbits
            n.kind = KIND_EXTERNAL
            if xattrs:
                # No budget check needed: neither key can exist after escaping, and the two
                # entries are far below the budget.
                new = dict(xattrs)
                new[fmt.OVERLAY_METACOPY] = _metacopy_value(inode.digest)
                if inode.payload:
                    new[fmt.OVERLAY_REDIRECT] = b"/" + inode.payload
                n.xattrs = new
            else:
                # The common case: the two overlay xattrs are implied by digest and payload
                # and encoded straight from them (_XattrEncoder.external_area).
                n.plain_external = True
        else:
            n.kind = KIND_INLINE
    elif ftype == S_IFDIR:
        n.kind = KIND_DIR
        n.nlink = 2  # §10.3: plus one per subdirectory, counted by _number
    elif ftype == S_IFLNK:
        _check_content(inode, n)
        if not inode.payload:
            raise TreeError(errno.EINVAL, "symlink without target", n.path())
        n.kind = KIND_SYMLINK
        n.size = len(inode.payload)
    elif ftype == S_IFCHR and inode.rdev == 0 and versioning is not None:
        assert parent is not None
        # §5.4: store the whiteout escaped, as an empty regular file.
        n.kind = KIND_INLINE
        n.size = 0
        n.mode = S_IFREG | (mode & ~S_IFMT)
        n.set_xattr(fmt.OVERLAY_ESCAPED_WHITEOUT, b"")
        n.set_xattr(fmt.USER_OVERLAY_WHITEOUT, b"")
        parent.set_xattr(fmt.OVERLAY_ESCAPED_WHITEOUTS, b"")
        parent.set_xattr(fmt.USER_OVERLAY_WHITEOUTS, b"")
        if versioning.for_whiteout() >= 1:
            parent.set_xattr(fmt.OVERLAY_ESCAPED_OPAQUE, b"x")
            parent.set_xattr(fmt.USER_OVERLAY_OPAQUE, b"x")
    elif ftype in FILE_TYPES:
        n.kind = KIND_OTHER
    else:
        raise TreeError(errno.EINVAL, f"invalid mode {mode:o}", n.path())
    return n


def _stub(root: _Node, name: bytes) -> _Node:
    """§5.7: a real whiteout that hides the object store's ``xx`` directories."""
    r = root.inode
    inode = Inode(
        S_IFCHR | 0o644, uid=r.uid, gid=r.gid, mtime_sec=r.mtime_sec, mtime_nsec=r.mtime_nsec
    )
    n = _make_node(inode, name, root, None)  # no versioning: stays a real whiteout
    selinux = root.xattrs.get(b"security.selinux")
    if selinux is not None:
        n.set_xattr(b"security.selinux", selinux)
    return n


def _number(tree: Tree, versioning: _Versioning) -> list[_Node]:
    """§6.1: breadth-first inode order, rewriting each inode for overlayfs on the way (§5).

    Also adds ``.`` and ``..`` to every directory (§5.5), the root's opaque marker (§5.6)
    and the root whiteout stubs (§5.7), each where the reference puts it, and counts each
    directory's links.
    """
    root = _make_node(tree.root, b"/", None, versioning)
    root.parent = root
    order = [root]
    links: list[tuple[list[tuple[bytes, _Node]], int, Inode]] = []
    make = _make_node
    new_node = _Node
    append = order.append
    i = 0
    while i < len(order):
        node = order[i]
        i += 1
        inode = node.inode
        entries = inode.entries
        if entries is None:
            continue
        names = [*entries, b".", b".."]
        if i == 1:
            names += [s for s in _STUB_NAMES if s not in entries]
        names.sort()
        dirents: list[tuple[bytes, _Node]] = []
        node.dirents = dirents
        add = dirents.append
        for name in names:
            child = entries.get(name)
            if child is None:
                if name == b".":
                    add((name, node))
                elif name == b"..":
                    add((name, node.parent))
                else:
                    stub = _stub(root, name)
                    append(stub)
                    add((name, stub))
            elif child.parent is inode and child.name == name:
                size = child.size
                payload = child.payload
                if (
                    child.mode & S_IFMT == S_IFREG
                    and 0 < size <= _PLAIN_SIZE_MAX
                    and child.content is None
                    and child.digest is None
                    and not child.xattrs
                    and (payload is None or (len(payload) <= PAYLOAD_MAX and 0 not in payload))
                ):
                    # Inlined _make_node for the most common inode by far: an external
                    # file, no xattrs of its own, one chunk.
                    cn = new_node()
                    cn.inode = child
                    cn.name = name
                    cn.parent = node
                    cn.xattr_budget = 0
                    cn.plain_external = True
                    cn.xattrs = child.xattrs
                    cn.mode = child.mode
                    cn.size = size
                    cn.nlink = child.nlink
                    cn.kind = KIND_EXTERNAL
                    bits = (size - 1).bit_length()
                    cn.chunkbits = bits if bits > fmt.BLOCK_BITS else fmt.BLOCK_BITS
                else:
                    cn = make(child, name, node, versioning)
                    if cn.kind == KIND_DIR:
                        node.nlink += 1
                append(cn)
                add((name, cn))
            else:
                # A further name of an inode whose home is elsewhere (a hardlink).
                links.append((dirents, len(dirents), child))
                add((name, node))
        if i == 1:
            # The reference marks the root opaque after rewriting its children and
            # creates the stubs after that (their selinux label is the root's).
            root.set_xattr(fmt.OVERLAY_OPAQUE, b"y")
    if links:
        by_inode = {id(n.inode): n for n in order}
        for dirents, index, child in links:
            name = dirents[index][0]
            target = by_inode.get(id(child))
            if target is None:
                raise TreeError(errno.EINVAL, "hardlink to an inode outside the tree", name)
            dirents[index] = (name, target)
    return order


def _key_info(key: bytes) -> tuple[int, bytes, int]:
    """§7.1/§7.5: (name index, suffix, name filter bit) of an xattr key."""
    index, suffix = 0, key
    for prefix, idx in fmt.XATTR_WRITE_PREFIXES:
        if key.startswith(prefix):
            index, suffix = idx, key[len(prefix) :]
            break
    bit = xxhash.xxh32_intdigest(suffix, fmt.EROFS_XATTR_FILTER_SEED + index) & 31
    return index, suffix, 1 << bit


def _xattr_entry(index: int, suffix: bytes, value: bytes) -> bytes:
    raw = fmt.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(-len(raw) % 4)


_PAD = [b"", b"\0\0\0", b"\0\0", b"\0"]
_METACOPY_SUFFIX = fmt.OVERLAY_METACOPY[len(b"trusted.") :]
_REDIRECT_SUFFIX = fmt.OVERLAY_REDIRECT[len(b"trusted.") :]
_METACOPY_ENTRY_EMPTY = (
    fmt.XATTR_ENTRY.pack(len(_METACOPY_SUFFIX), fmt.EROFS_XATTR_INDEX_TRUSTED, 0) + _METACOPY_SUFFIX
)
_METACOPY_ENTRY_FULL = (
    fmt.XATTR_ENTRY.pack(len(_METACOPY_SUFFIX), fmt.EROFS_XATTR_INDEX_TRUSTED, fmt.METACOPY_SIZE)
    + _METACOPY_SUFFIX
    + _METACOPY_HEADER
)
_REDIRECT_ENTRY = bytes([len(_REDIRECT_SUFFIX), fmt.EROFS_XATTR_INDEX_TRUSTED])
_METACOPY_FILTER = 0xFFFFFFFF & ~_key_info(fmt.OVERLAY_METACOPY)[2]
_EXTERNAL_FILTER = _METACOPY_FILTER & ~_key_info(fmt.OVERLAY_REDIRECT)[2]


_IBODY_HEADER_SIZE = fmt.XATTR_IBODY_HEADER.size


def _heads(name_filter: int) -> list[bytes]:
    """Area headers with no, one or two (zeroed) shared reference slots."""
    return [fmt.XATTR_IBODY_HEADER.pack(name_filter, k) + bytes(4 * k) for k in range(3)]


_METACOPY_HEADS = _heads(_METACOPY_FILTER)  # plain external files without a payload
_EXTERNAL_HEADS = _heads(_EXTERNAL_FILTER)


class _XattrEncoder:
    """The shared xattr table (§7.4) and each inode's xattr area (§7.3).

    Plain external files (``_Node.plain_external``) carry their metacopy and redirect
    xattrs implicitly; they are counted and encoded from the inode's digest and payload.
    """

    def __init__(self, order: list[_Node]) -> None:
        counts = Counter([kv for n in order if n.xattrs for kv in n.xattrs.items()])
        plain = [n.inode for n in order if n.plain_external]
        metacopy, redirect = fmt.OVERLAY_METACOPY, fmt.OVERLAY_REDIRECT
        # Fold the implicit pairs in where they can be shared: used twice among plain files,
        # or also present on a file with other xattrs.
        explicit_mc = {v for k, v in counts if k == metacopy}
        for digest, c in Counter([i.digest for i in plain]).items():
            value = _metacopy_value(digest)
            if c > 1 or value in explicit_mc:
                counts[(metacopy, value)] += c
        explicit_rd = {v for k, v in counts if k == redirect}
        for payload, c in Counter([i.payload for i in plain if i.payload]).items():
            value = b"/" + payload
            if c > 1 or value in explicit_rd:
                counts[(redirect, value)] += c

        self.key_info: dict[bytes, tuple[int, bytes, int]] = {}
        self.keys_info: dict[tuple[bytes, ...], tuple[int, list[tuple[int, bytes]]]] = {}
        shared = sorted(
            (kv for kv, c in counts.items() if c > 1),
            key=lambda kv: (kv[0], len(kv[1]), kv[1]),
            reverse=True,
        )
        self.table_offset: dict[tuple[bytes, bytes], int] = {}
        self.metacopy_offset: dict[bytes | None, int] = {}  # by digest
        self.redirect_offset: dict[bytes, int] = {}  # by payload
        table = bytearray()
        for kv in shared:
            key, value = kv
            index, suffix, _bit = self.info(key)
            self.table_offset[kv] = len(table)
            if key == metacopy:
                self.metacopy_offset[value[4:] if value else None] = len(table)
            elif key == redirect:
                self.redirect_offset[value[1:]] = len(table)
            table += _xattr_entry(index, suffix, value)
        self.table = bytes(table)

    def info(self, key: bytes) -> tuple[int, bytes, int]:
        info = self.key_info.get(key)
        if info is None:
            info = self.key_info[key] = _key_info(key)
        return info

    def external_area(self, inode: Inode) -> tuple[int, bytes, list[int]]:
        """:meth:`area` of a plain external file, from its digest and payload."""
        refs: list[int] = []
        digest = inode.digest
        off = self.metacopy_offset.get(digest)
        if off is None:
            # 4 + 16 + 0 or 36 bytes: never needs padding
            body = _METACOPY_ENTRY_EMPTY if digest is None else _METACOPY_ENTRY_FULL + digest
        else:
            refs.append(off)
            body = b""
        payload = inode.payload
        if payload:
            off = self.redirect_offset.get(payload)
            if off is None:
                n = len(payload) + 1
                body += (
                    _REDIRECT_ENTRY + n.to_bytes(2, "little") + _REDIRECT_SUFFIX + b"/" + payload
                    + _PAD[(20 + n) & 3]
                )  # fmt: skip
            else:
                refs.append(off)
            blob = _EXTERNAL_HEADS[len(refs)] + body
        else:
            blob = _METACOPY_HEADS[len(refs)] + body
        return (len(blob) - _IBODY_HEADER_SIZE) // 4 + 1, blob, refs

    def area(self, xattrs: dict[bytes, bytes]) -> tuple[int, bytes, list[int]]:
        """An inode's xattr area (§7.3): (i_xattr_icount, the encoded area, shared table
        offsets).  The area's reference slots are left zero: they are relative to the end
        of the inode area, which is known only at the end."""
        keys = tuple(sorted(xattrs))
        cached = self.keys_info.get(keys)
        if cached is None:
            bits = 0
            infos = []
            for key in keys:
                index, suffix, bit = self.info(key)
                bits |= bit
                infos.append((index, suffix))
            cached = self.keys_info[keys] = (0xFFFFFFFF & ~bits, infos)
        name_filter, infos = cached
        refs: list[int] = []
        inline: list[bytes] = []
        table_offset = self.table_offset
        for key, (index, suffix) in zip(keys, infos, strict=True):
            value = xattrs[key]
            off = table_offset.get((key, value))
            if off is not None and len(refs) < fmt.MAX_SHARED_XATTRS_PER_INODE:
                refs.append(off)
            else:
                raw = fmt.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
                inline.append(raw + bytes(-len(raw) % 4))
        return _area(name_filter, refs, b"".join(inline))


def _area(name_filter: int, refs: list[int], body: bytes) -> tuple[int, bytes, list[int]]:
    """(i_xattr_icount, encoded area with zeroed reference slots, references)."""
    blob = fmt.XATTR_IBODY_HEADER.pack(name_filter, len(refs)) + bytes(4 * len(refs)) + body
    return (len(blob) - _IBODY_HEADER_SIZE) // 4 + 1, blob, refs


def _layout_dir(n: _Node) -> tuple[int, int]:
    """§8.1: greedy packing of the entries into blocks; returns (n_blocks, tail)."""
    split: list[int] = []
    used = 0
    for idx, (name, _t) in enumerate(n.dirents):
        cost = 12 + len(name)
        if used + cost > BLOCK_SIZE:
            split.append(idx)
            used = 0
        used += cost
    n.split = split
    if used > HALF_BLOCK:
        return len(split) + 1, 0
    return len(split), used


def build_image(tree: Tree, *, min_version: int = 0, max_version: int = 1) -> bytes:
    """Write ``tree`` as a composefs image and return its bytes.

    Raises :class:`TreeError` with the errno the reference reports (EFBIG for files with
    more than 1024 chunks, ERANGE for xattrs over budget, EINVAL, ELOOP...).
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many small objects, no garbage cycles: collection passes are pure cost
    try:
        return _build(tree, min_version, max_version)
    finally:
        if gc_was_enabled:
            gc.enable()


def _build(tree: Tree, min_version: int, max_version: int) -> bytes:
    versioning = _Versioning(min_version, max_version)
    order = _number(tree, versioning)
    encoder = _XattrEncoder(order)
    area_of = encoder.area
    external_area = encoder.external_area

    # §6.3: minimum mtime and the ACL flag.
    inodes = [n.inode for n in order]
    min_sec = min([i.mtime_sec for i in inodes])
    min_nsec = min([i.mtime_nsec for i in inodes if i.mtime_sec == min_sec])
    has_acl = any(
        b"system.posix_acl_access" in n.xattrs or b"system.posix_acl_default" in n.xattrs
        for n in order
        if n.xattrs
    )

    # One pass over the inode order: data layout (§8), form (§8.6), placement (§9) and the
    # inode area itself (§10).  What depends on later inodes or on the end of the inode
    # area is recorded and filled in afterwards: directory entries (they hold the nids of
    # children), shared xattr references (relative to the block holding inodes_end) and
    # block addresses (the data area starts after the shared xattr table).
    meta = bytearray(fmt.SUPERBLOCK_END)
    pack_compact = fmt.INODE_COMPACT.pack
    pack_extended = fmt.INODE_EXTENDED.pack
    flat_inline = fmt.EROFS_INODE_FLAT_INLINE << 1
    chunk_based = fmt.EROFS_INODE_CHUNK_BASED << 1
    block_users: list[tuple[int, _Node]] = []  # (offset of i_u, node) with data blocks
    ref_slots: list[tuple[int, list[int]]] = []  # (offset, table offsets) of shared refs
    dir_tails: list[tuple[int, _Node]] = []  # (offset, directory) of inline entries
    pos = fmt.SUPERBLOCK_END  # == len(meta) at the start of each inode
    for ino, n in enumerate(order):
        kind = n.kind
        n_blocks = tail = 0
        size = n.size
        inode = n.inode
        if kind == KIND_EXTERNAL:
            tail = -((-size >> n.chunkbits) << 2)  # 4 bytes per chunk
        elif kind == KIND_DIR:
            n_blocks, tail = _layout_dir(n)
            size = n_blocks * BLOCK_SIZE + tail
        elif kind == KIND_INLINE:
            if size:
                n_blocks, tail = divmod(size, BLOCK_SIZE)
                if tail > HALF_BLOCK:
                    n_blocks += 1
                    tail = 0
        elif kind == KIND_SYMLINK:
            tail = size
        nlink = n.nlink
        extended = (
            inode.mtime_sec != min_sec
            or inode.mtime_nsec != min_nsec
            or nlink > 0xFFFF
            or inode.uid > 0xFFFF
            or inode.gid > 0xFFFF
            or size > 0xFFFFFFFF
        )
        inode_size = 64 if extended else 32
        if n.plain_external:
            area = external_area(inode)
            meta_size = inode_size + len(area[1])
        elif n.xattrs:
            area = area_of(n.xattrs)
            meta_size = inode_size + len(area[1])
        else:
            area = None
            meta_size = inode_size

        # §9 placement
        start = pos
        pos = (pos + 31) & ~31
        if kind == KIND_SYMLINK:
            total = meta_size + tail
            if total >= BLOCK_SIZE:
                n_blocks = 1
                tail = 0
            if pos >> 12 != (pos + total - 1) >> 12:
                pos = round_up(pos, BLOCK_SIZE)
        elif tail:
            rem = BLOCK_SIZE - (pos + meta_size) % BLOCK_SIZE
            if rem < tail:
                pad = round_up(rem, fmt.SLOT_SIZE)
                if tail <= BLOCK_SIZE - (pos + meta_size + pad) % BLOCK_SIZE:
                    pos += pad
                else:
                    n_blocks += 1
                    tail = 0
                    pos = round_up(pos, BLOCK_SIZE)
        n.nid = pos >> 5
        n.n_blocks = n_blocks
        n.tail = tail
        if pos != start:
            meta += bytes(pos - start)

        # §10.3-§10.6 the inode (i_u of inodes with data blocks is filled in later)
        mode = n.mode
        i_format = flat_inline if tail else 0
        if kind == KIND_EXTERNAL:
            i_u = n.chunkbits - fmt.BLOCK_BITS
            i_format = chunk_based
        elif kind == KIND_OTHER:
            size = 0
            i_u = inode.rdev & 0xFFFFFFFF if mode & S_IFMT in (S_IFCHR, S_IFBLK) else 0
        else:
            i_u = 0
            if kind == KIND_DIR:
                size = n_blocks * BLOCK_SIZE + tail
        if n_blocks:
            block_users.append((pos + 16, n))
        if extended:
            meta += pack_extended(
                i_format | 1, area[0] if area else 0, mode & 0xFFFF, 0, size, i_u, ino,
                inode.uid, inode.gid, inode.mtime_sec, inode.mtime_nsec, nlink,
            )  # fmt: skip
        else:
            meta += pack_compact(
                i_format, area[0] if area else 0, mode & 0xFFFF, nlink, size, 0, i_u, ino,
                inode.uid, inode.gid, 0,
            )  # fmt: skip
        if area is not None:
            if area[2]:
                ref_slots.append((pos + inode_size + _IBODY_HEADER_SIZE, area[2]))
            meta += area[1]
        # §10.7 the inline tail
        if tail:
            if kind == KIND_DIR:
                dir_tails.append((pos + meta_size, n))
                meta += bytes(tail)
            elif kind == KIND_EXTERNAL:
                meta += b"\xff" * tail
            elif kind == KIND_SYMLINK:
                meta += inode.payload or b""
            else:
                content = inode.content or b""
                meta += content[len(content) - tail :]
        pos += meta_size + tail

    inodes_end = round_up(pos, fmt.SLOT_SIZE)
    table = encoder.table
    data_start = round_up(inodes_end + len(table), BLOCK_SIZE)
    data_blkaddr = data_start // BLOCK_SIZE
    n_data_blocks = sum(n.n_blocks for _off, n in block_users)
    blocks = data_blkaddr + n_data_blocks
    root_nid = order[0].nid
    if root_nid > 0xFFFF:
        raise TreeError(errno.EFBIG, "the root inode is beyond what the superblock addresses")

    image = meta
    image += bytes(data_start - len(image))
    image[inodes_end : inodes_end + len(table)] = table
    shared_base = inodes_end % BLOCK_SIZE
    pack_u32 = fmt.XATTR_SHARED_REF.pack_into
    for off, refs in ref_slots:
        for r in refs:
            pack_u32(image, off, (shared_base + r) >> 2)
            off += 4
    for off, n in dir_tails:
        _write_dirents(image, off, n.dirents, n.split[-1] if n.split else 0, len(n.dirents))
    image += bytes(n_data_blocks * BLOCK_SIZE)
    _write_data_blocks(image, block_users, data_blkaddr)

    fmt.COMPOSEFS_HEADER.pack_into(
        image,
        0,
        fmt.COMPOSEFS_MAGIC,
        fmt.COMPOSEFS_HEADER_VERSION,
        fmt.COMPOSEFS_FLAGS_HAS_ACL if has_acl else 0,
        versioning.version,
    )
    fmt.SUPERBLOCK.pack_into(
        image,
        fmt.EROFS_SUPER_OFFSET,
        fmt.EROFS_SUPER_MAGIC_V1,
        0,  # checksum
        fmt.EROFS_FEATURE_COMPAT_MTIME | fmt.EROFS_FEATURE_COMPAT_XATTR_FILTER,
        fmt.BLOCK_BITS,
        0,  # sb_extslots
        root_nid,
        len(order),
        min_sec,
        min_nsec,
        blocks,
        0,  # meta_blkaddr: the inode area starts right after the superblock
        inodes_end // BLOCK_SIZE,
        b"",
        b"",
        0,  # feature_incompat: none, although chunk-based files are used
        *(0,) * 8,
    )
    return bytes(image)


def _write_data_blocks(
    image: bytearray, block_users: list[tuple[int, _Node]], blkaddr: int
) -> None:
    """§11 step 7: data blocks in inode order, and each user's block address in its i_u."""
    pack_u32 = fmt.XATTR_SHARED_REF.pack_into
    for i_u_offset, n in block_users:
        addr = blkaddr
        blkaddr += n.n_blocks
        start = addr * BLOCK_SIZE
        kind = n.kind
        if kind == KIND_EXTERNAL:
            # §9: a chunk index array that did not fit beside its inode
            pack_u32(image, i_u_offset, (addr & 0xFFFF0000) | (n.chunkbits - fmt.BLOCK_BITS))
            image[start : start + BLOCK_SIZE] = b"\xff" * BLOCK_SIZE
            continue
        pack_u32(image, i_u_offset, addr)
        if kind == KIND_DIR:
            dirents = n.dirents
            starts = [0, *n.split]
            ends = [*n.split, len(dirents)]
            for k in range(n.n_blocks):
                _write_dirents(image, start + k * BLOCK_SIZE, dirents, starts[k], ends[k])
        elif kind == KIND_SYMLINK:
            target = n.inode.payload or b""
            image[start : start + len(target)] = target
        else:
            data = (n.inode.content or b"")[: n.n_blocks * BLOCK_SIZE]
            image[start : start + len(data)] = data


def _write_dirents(
    image: bytearray, off: int, dirents: list[tuple[bytes, _Node]], start: int, end: int
) -> None:
    """§10.8: one directory chunk (a block or the inline tail) at ``off``."""
    nameoff = 12 * (end - start)
    pack = fmt.DIRENT.pack_into
    ftypes = _FTYPE
    rec = off
    names = []
    for k in range(start, end):
        name, target = dirents[k]
        pack(image, rec, target.nid, nameoff, ftypes[target.mode & S_IFMT], 0)
        rec += 12
        nameoff += len(name)
        names.append(name)
    blob = b"".join(names)
    image[rec : rec + len(blob)] = blob
