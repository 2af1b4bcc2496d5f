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
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterable

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
_KIND_OTHER, _KIND_DIR, _KIND_INLINE, _KIND_EXTERNAL, _KIND_SYMLINK = range(5)


class _Node:
    """One inode as the writer sees it after the overlayfs rewrite."""

    __slots__ = (
        "blkaddr",
        "budget",
        "chunkbits",
        "content",
        "dirents",
        "extended",
        "inode",
        "kind",
        "mode",
        "n_blocks",
        "nid",
        "parent",
        "path_name",
        "size",
        "split",
        "tail",
        "xattr_area",
        "xattrs",
    )

    inode: Inode
    mode: int
    size: int
    xattrs: dict[bytes, bytes]
    budget: int
    dirents: list[tuple[bytes, _Node]] | None
    content: bytes | None
    kind: int
    n_blocks: int
    tail: int
    chunkbits: int
    split: list[int]
    extended: bool
    xattr_area: list[tuple[bytes, int]]  # (inline entry bytes or b"" for a ref, table offset)
    nid: int
    blkaddr: int
    parent: _Node
    path_name: bytes

    def set_xattr(self, key: bytes, value: bytes) -> None:
        """Add or replace an xattr, with the reference's budget check (§5.8).

        The reference's copy of the tree starts every inode's budget counter at 0 even when
        the inode already has xattrs; replacing one of those can therefore drive the
        (unsigned) counter below zero, which then fails.  Emulated for error compatibility.
        """
        xattrs = self.xattrs
        old = xattrs.pop(key, None)
        if old is not None:
            if xattrs:
                self.budget -= XATTR_ENTRY_OVERHEAD + len(key) + len(old)
            else:
                self.budget = 0
        entry = XATTR_ENTRY_OVERHEAD + len(key) + len(value)
        if not xattrs:
            entry += XATTR_HEADER_OVERHEAD
        if (self.budget + entry) & U64 > XATTR_BUDGET:
            raise TreeError(errno.ERANGE, f"cannot add xattr {key.decode()}", self.path_name)
        self.budget += entry
        xattrs[key] = value


def _new_node(inode: Inode, name: bytes) -> _Node:
    n = _Node()
    n.inode = inode
    n.mode = inode.mode
    n.size = inode.size
    n.budget = 0
    n.dirents = None
    n.content = None
    n.path_name = name
    xattrs = inode.xattrs
    if xattrs:
        # §5.2: only trusted.overlay.* is escaped, by one more "overlay." level.
        n.xattrs = {
            (fmt.OVERLAY_ESCAPED_PREFIX + k[16:] if k.startswith(fmt.OVERLAY_PREFIX) else k): v
            for k, v in xattrs.items()
        }
    else:
        n.xattrs = {}
    return n


def _stub(root: _Node, name: bytes) -> _Node:
    """§5.7: a real whiteout that hides the object store's ``xx`` directories."""
    inode = Inode(
        S_IFCHR | 0o644,
        uid=root.inode.uid,
        gid=root.inode.gid,
        mtime_sec=root.inode.mtime_sec,
        mtime_nsec=root.inode.mtime_nsec,
    )
    n = _new_node(inode, name)
    n.kind = _KIND_OTHER
    n.parent = root
    selinux = root.xattrs.get(b"security.selinux")
    if selinux is not None:
        n.set_xattr(b"security.selinux", selinux)
    return n


def choose_version(tree: Tree, min_version: int = 0, max_version: int = 1) -> int:
    """§4: the base version, bumped to 1 when allowed and the tree holds a whiteout."""
    if not 0 <= min_version <= fmt.COMPOSEFS_VERSION_MAX:
        raise TreeError(errno.EINVAL, f"unsupported format version {min_version}")
    if not 0 <= max_version <= fmt.COMPOSEFS_VERSION_MAX:
        raise TreeError(errno.EINVAL, f"unsupported format version {max_version}")
    max_version = max(max_version, min_version)
    if min_version < 1 <= max_version:
        for _path, inode in _real_inodes(tree):
            if inode.mode & S_IFMT == S_IFCHR and inode.rdev == 0:
                return 1
    return min_version


def _real_inodes(tree: Tree) -> Iterable[tuple[bytes, Inode]]:
    stack = [tree.root]
    while stack:
        d = stack.pop()
        assert d.entries is not None
        for name, child in d.entries.items():
            if child.parent is d and child.name == name:
                yield name, child
                if child.entries is not None:
                    stack.append(child)


def _validate(n: _Node) -> None:
    inode = n.inode
    ftype = inode.mode & S_IFMT
    if ftype not in FILE_TYPES:
        raise TreeError(errno.EINVAL, f"invalid mode {inode.mode:o}", n.path_name)
    payload = inode.payload
    if payload is not None and (len(payload) > PAYLOAD_MAX or b"\0" in payload):
        raise TreeError(errno.ENAMETOOLONG, "payload too long", n.path_name)
    if ftype == S_IFLNK and not payload:
        raise TreeError(errno.EINVAL, "symlink without target", n.path_name)
    content = inode.content
    if content is not None and ftype == S_IFREG:
        if len(content) > INLINE_CONTENT_MAX:
            raise TreeError(errno.EINVAL, "inline content too large", n.path_name)
        if len(content) != inode.size:
            raise TreeError(errno.EINVAL, "content length differs from size", n.path_name)
    digest = inode.digest
    if digest is not None and len(digest) != DIGEST_SIZE:
        raise TreeError(errno.EINVAL, "digest must be 32 bytes", n.path_name)


def _chunking(size: int) -> tuple[int, int]:
    """§8.3: (chunkbits, chunk_count) of an external file."""
    chunkbits = max((size - 1).bit_length(), fmt.BLOCK_BITS)
    if chunkbits - fmt.BLOCK_BITS > 31:
        chunkbits = 43
    return chunkbits, -(-size // (1 << chunkbits))


def _rewrite(n: _Node, parent: _Node, version: int) -> None:
    """§5.1, §5.3, §5.4 for one inode (escaping already happened in ``_new_node``)."""
    _validate(n)
    inode = n.inode
    ftype = n.mode & S_IFMT
    if ftype == S_IFREG:
        content = inode.content
        if n.size > 0 and not content:
            chunkbits, count = _chunking(n.size)
            if count > MAX_CHUNKS:
                raise TreeError(errno.EFBIG, path=n.path_name)
            n.chunkbits = chunkbits
            digest = inode.digest
            metacopy = (
                fmt.METACOPY_HEADER.pack(0, fmt.METACOPY_SIZE, 0, fmt.FS_VERITY_HASH_ALG_SHA256)
                + digest
                if digest is not None
                else b""
            )
            n.set_xattr(fmt.OVERLAY_METACOPY, metacopy)
            if inode.payload:
                n.set_xattr(fmt.OVERLAY_REDIRECT, b"/" + inode.payload)
            n.kind = _KIND_EXTERNAL
        else:
            n.content = content or None
            n.kind = _KIND_INLINE
    elif ftype == S_IFCHR and inode.rdev == 0:
        # §5.4: store the whiteout escaped, as an empty regular file.
        n.size = 0
        n.mode = S_IFREG | (n.mode & ~S_IFMT)
        n.kind = _KIND_INLINE
        n.set_xattr(fmt.OVERLAY_ESCAPED_WHITEOUT, b"")
        n.set_xattr(fmt.USER_OVERLAY_WHITEOUT, b"")
        parent.set_xattr(fmt.OVERLAY_ESCAPED_WHITEOUTS, b"")
        parent.set_xattr(fmt.USER_OVERLAY_WHITEOUTS, b"")
        if version >= 1:
            parent.set_xattr(fmt.OVERLAY_ESCAPED_OPAQUE, b"x")
            parent.set_xattr(fmt.USER_OVERLAY_OPAQUE, b"x")
    elif ftype == S_IFDIR:
        n.kind = _KIND_DIR
    elif ftype == S_IFLNK:
        n.kind = _KIND_SYMLINK
        n.size = len(inode.payload or b"")
    else:
        n.kind = _KIND_OTHER


def _number(tree: Tree, version: int) -> list[_Node]:
    """§6.1: breadth-first inode order, rewriting each inode for overlayfs on the way (§5).

    Also adds ``.`` and ``..`` to every directory (§5.5), the root's opaque marker (§5.6)
    and the root whiteout stubs (§5.7), each in the place the reference gives it.
    """
    root = _new_node(tree.root, b"/")
    root.parent = root
    _rewrite(root, root, version)
    order = [root]
    by_inode: dict[int, _Node] = {id(tree.root): root}
    links: list[tuple[list[tuple[bytes, _Node]], int, Inode]] = []
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
        for name in names:
            child = entries.get(name)
            if child is None:
                if name == b".":
                    dirents.append((name, node))
                elif name == b"..":
                    dirents.append((name, node.parent))
                else:
                    stub = _stub(root, name)
                    order.append(stub)
                    dirents.append((name, stub))
            elif child.parent is inode and child.name == name:
                cn = _new_node(child, name)
                cn.parent = node
                by_inode[id(child)] = cn
                _rewrite(cn, node, version)
                order.append(cn)
                dirents.append((name, cn))
            else:
                # A further name of an inode whose home is elsewhere (a hardlink).
                links.append((dirents, len(dirents), child))
                dirents.append((name, node))
        if i == 1:
            # The reference marks the root opaque after rewriting its children and
            # creates the stubs after that (their selinux label is the root's).
            root.set_xattr(fmt.OVERLAY_OPAQUE, b"y")
    for dirents, index, child in links:
        target = by_inode.get(id(child))
        if target is None:
            name = dirents[index][0]
            raise TreeError(errno.EINVAL, "hardlink to an inode outside the tree", name)
        dirents[index] = (dirents[index][0], target)
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


class _Xattrs:
    """Per-image xattr encoding: the shared table (§7.4) and each inode's area (§7.3)."""

    def __init__(self, order: list[_Node]) -> None:
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for n in order:
            if n.xattrs:
                counts.update(n.xattrs.items())
        self.key_info: dict[bytes, tuple[int, bytes, int]] = {}
        shared = sorted(
            (kv for kv, c in counts.items() if c > 1),
            key=lambda kv: (kv[0], len(kv[1]), kv[1]),
            reverse=True,
        )
        self.table_offset: dict[tuple[bytes, bytes], int] = {}
        table = bytearray()
        for kv in shared:
            index, suffix, _bit = self.info(kv[0])
            self.table_offset[kv] = len(table)
            table += _xattr_entry(index, suffix, kv[1])
        self.table = bytes(table)

    def info(self, key: bytes) -> tuple[int, bytes, int]:
        info = self.key_info.get(key)
        if info is None:
            info = self.key_info[key] = _key_info(key)
        return info

    def layout(self, n: _Node) -> tuple[int, int, list[int], bytes]:
        """(xattr area size, name filter, shared table offsets, inline entries) of a node."""
        if not n.xattrs:
            return 0, 0, [], b""
        bits = 0
        refs: list[int] = []
        inline: list[bytes] = []
        table_offset = self.table_offset
        for key in sorted(n.xattrs):
            value = n.xattrs[key]
            index, suffix, bit = self.info(key)
            bits |= bit
            off = table_offset.get((key, value))
            if off is not None and len(refs) < fmt.MAX_SHARED_XATTRS_PER_INODE:
                refs.append(off)
            else:
                inline.append(_xattr_entry(index, suffix, value))
        body = b"".join(inline)
        size = fmt.XATTR_IBODY_HEADER.size + 4 * len(refs) + len(body)
        return size, 0xFFFFFFFF & ~bits, refs, body


def build_image(tree: Tree, *, min_version: int = 0, max_version: int = 1) -> bytes:
    """Write ``tree`` as a composefs image and return its bytes.

    Raises :class:`TreeError` with the errno the reference reports (EFBIG for files with
    more than 1024 chunks, ERANGE for xattrs over budget, EINVAL, ELOOP...).
    """
    version = choose_version(tree, min_version, max_version)
    order = _number(tree, version)
    xattrs = _Xattrs(order)

    # §6.3: minimum mtime and the ACL flag.
    min_mtime = min((n.inode.mtime_sec, n.inode.mtime_nsec) for n in order)
    has_acl = any(
        b"system.posix_acl_access" in n.xattrs or b"system.posix_acl_default" in n.xattrs
        for n in order
        if n.xattrs
    )

    # §8 and §9: data layout, inode form, placement.
    pos = fmt.SUPERBLOCK_END
    n_data_blocks = 0
    areas: list[tuple[int, int, list[int], bytes]] = []
    nlinks: list[int] = []
    for n in order:
        kind = n.kind
        n_blocks = tail = 0
        size_for_form = n.size
        if kind == _KIND_DIR:
            assert n.dirents is not None
            split: list[int] = []
            used = 0
            for idx, (name, _t) in enumerate(n.dirents):
                cost = 12 + len(name)
                if used + cost > BLOCK_SIZE:
                    split.append(idx)
                    used = 0
                used += cost
            n_blocks = len(split)
            if used > BLOCK_SIZE // 2:
                n_blocks += 1
            else:
                tail = used
            n.split = split
            size_for_form = n_blocks * BLOCK_SIZE + tail
            nlink = 2
            for name, child in n.dirents:
                if child.kind == _KIND_DIR and child.parent is n and child.path_name == name:
                    nlink += 1
        else:
            nlink = n.inode.nlink
            if kind == _KIND_INLINE:
                size = n.size
                n_blocks, tail = divmod(size, BLOCK_SIZE)
                if tail > BLOCK_SIZE // 2:
                    n_blocks += 1
                    tail = 0
            elif kind == _KIND_EXTERNAL:
                tail = 4 * -(-n.size // (1 << n.chunkbits))
            elif kind == _KIND_SYMLINK:
                tail = n.size
        nlinks.append(nlink)
        inode = n.inode
        extended = not (
            (inode.mtime_sec, inode.mtime_nsec) == min_mtime
            and nlink <= 0xFFFF
            and inode.uid <= 0xFFFF
            and inode.gid <= 0xFFFF
            and size_for_form <= 0xFFFFFFFF
        )
        n.extended = extended
        area = xattrs.layout(n)
        areas.append(area)
        meta = (64 if extended else 32) + area[0]

        pos = round_up(pos, fmt.SLOT_SIZE)
        if kind == _KIND_SYMLINK:
            total = meta + tail
            if total >= BLOCK_SIZE:
                n_blocks = 1
                tail = 0
            if pos // BLOCK_SIZE != (pos + total - 1) // BLOCK_SIZE:
                pos = round_up(pos, BLOCK_SIZE)
        else:
            rem = BLOCK_SIZE - (pos + meta) % BLOCK_SIZE
            if rem < tail:
                pad = round_up(rem, fmt.SLOT_SIZE)
                rem2 = BLOCK_SIZE - (pos + meta + pad) % BLOCK_SIZE
                if tail <= rem2:
                    pos += pad
                else:
                    n_blocks += 1
                    tail = 0
                    pos = round_up(pos, BLOCK_SIZE)
        n.nid = pos // fmt.SLOT_SIZE
        n.n_blocks = n_blocks
        n.tail = tail
        pos += meta + tail
        n_data_blocks += n_blocks
    inodes_end = round_up(pos, fmt.SLOT_SIZE)
    data_start = round_up(inodes_end + len(xattrs.table), BLOCK_SIZE)
    blocks = data_start // BLOCK_SIZE + n_data_blocks
    root_nid = order[0].nid
    if root_nid > 0xFFFF:
        raise TreeError(errno.EFBIG, "root inode beyond what the superblock can address")

    image = bytearray(blocks * BLOCK_SIZE)
    fmt.COMPOSEFS_HEADER.pack_into(
        image,
        0,
        fmt.COMPOSEFS_MAGIC,
        fmt.COMPOSEFS_HEADER_VERSION,
        fmt.COMPOSEFS_FLAGS_HAS_ACL if has_acl else 0,
        version,
    )
    fmt.SUPERBLOCK.pack_into(
        image,
        fmt.EROFS_SUPER_OFFSET,
        fmt.EROFS_SUPER_MAGIC_V1,
        0,
        fmt.EROFS_FEATURE_COMPAT_MTIME | fmt.EROFS_FEATURE_COMPAT_XATTR_FILTER,
        fmt.BLOCK_BITS,
        0,
        root_nid,
        len(order),
        min_mtime[0],
        min_mtime[1],
        blocks,
        0,
        inodes_end // BLOCK_SIZE,
        b"",
        b"",
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    shared_base = inodes_end % BLOCK_SIZE
    image[inodes_end : inodes_end + len(xattrs.table)] = xattrs.table

    blkaddr = data_start // BLOCK_SIZE
    pack_compact = fmt.INODE_COMPACT.pack_into
    pack_extended = fmt.INODE_EXTENDED.pack_into
    pack_header = fmt.XATTR_IBODY_HEADER.pack_into
    for ino, n in enumerate(order):
        kind = n.kind
        n_blocks = n.n_blocks
        tail = n.tail
        if n_blocks:
            addr = blkaddr
            blkaddr += n_blocks
        else:
            addr = 0
        mode = n.mode
        if kind == _KIND_DIR:
            i_size = n_blocks * BLOCK_SIZE + tail
            i_u = addr
        elif kind == _KIND_INLINE:
            i_size = n.size
            i_u = addr
        elif kind == _KIND_EXTERNAL:
            i_size = n.size
            i_u = (addr & 0xFFFF0000) | (n.chunkbits - fmt.BLOCK_BITS)
        elif kind == _KIND_SYMLINK:
            i_size = n.size
            i_u = addr
        else:
            i_size = 0
            ftype = mode & S_IFMT
            i_u = n.inode.rdev & 0xFFFFFFFF if ftype in (S_IFCHR, S_IFBLK) else 0
        if kind == _KIND_EXTERNAL:
            layout = fmt.EROFS_INODE_CHUNK_BASED
        elif tail:
            layout = fmt.EROFS_INODE_FLAT_INLINE
        else:
            layout = fmt.EROFS_INODE_FLAT_PLAIN
        xsize, xfilter, refs, inline = areas[ino]
        icount = (xsize - 12) // 4 + 1 if xsize else 0
        off = n.nid * fmt.SLOT_SIZE
        inode = n.inode
        if n.extended:
            pack_extended(
                image,
                off,
                (layout << 1) | 1,
                icount,
                mode & 0xFFFF,
                0,
                i_size,
                i_u,
                ino,
                inode.uid,
                inode.gid,
                inode.mtime_sec,
                inode.mtime_nsec,
                nlinks[ino],
            )
            off += 64
        else:
            pack_compact(
                image,
                off,
                layout << 1,
                icount,
                mode & 0xFFFF,
                nlinks[ino],
                i_size,
                0,
                i_u,
                ino,
                inode.uid,
                inode.gid,
                0,
            )
            off += 32
        if xsize:
            pack_header(image, off, xfilter, len(refs))
            off += 12
            for r in refs:
                fmt.XATTR_SHARED_REF.pack_into(image, off, (shared_base + r) // 4)
                off += 4
            image[off : off + len(inline)] = inline
            off += len(inline)
        # the inline tail, then the data blocks
        if kind == _KIND_DIR:
            assert n.dirents is not None
            starts = [0, *n.split]
            ends = [*n.split, len(n.dirents)]
            for k in range(n_blocks):
                _write_dirents(image, (addr + k) * BLOCK_SIZE, n.dirents, starts[k], ends[k])
            if tail:
                _write_dirents(image, off, n.dirents, starts[-1], ends[-1])
        elif kind == _KIND_INLINE:
            content = n.content
            if content:
                if tail:
                    image[off : off + tail] = content[len(content) - tail :]
                if n_blocks:
                    data = content[: n_blocks * BLOCK_SIZE]
                    image[addr * BLOCK_SIZE : addr * BLOCK_SIZE + len(data)] = data
        elif kind == _KIND_EXTERNAL:
            if tail:
                image[off : off + tail] = b"\xff" * tail
            if n_blocks:
                image[addr * BLOCK_SIZE : (addr + 1) * BLOCK_SIZE] = b"\xff" * BLOCK_SIZE
        elif kind == _KIND_SYMLINK:
            target = n.inode.payload or b""
            if tail:
                image[off : off + tail] = target
            else:
                image[addr * BLOCK_SIZE : addr * BLOCK_SIZE + len(target)] = target
    return bytes(image)


def _write_dirents(
    image: bytearray, off: int, dirents: list[tuple[bytes, _Node]], start: int, end: int
) -> None:
    """§10.8: one directory chunk (a block or the inline tail) at ``off``."""
    nameoff = 12 * (end - start)
    names = []
    pack = fmt.DIRENT.pack_into
    rec = off
    for k in range(start, end):
        name, target = dirents[k]
        pack(image, rec, target.nid, nameoff, _FTYPE[target.mode & S_IFMT], 0)
        rec += 12
        nameoff += len(name)
        names.append(name)
    blob = b"".join(names)
    image[rec : rec + len(blob)] = blob
