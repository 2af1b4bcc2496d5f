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
from collections.abc import Iterator

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
_METACOPY_HEADER = fmt.METACOPY_HEADER.pack(0, fmt.METACOPY_SIZE, 0, fmt.FS_VERITY_HASH_ALG_SHA256)


class _Node:
    """One inode as the writer sees it after the overlayfs rewrite."""

    __slots__ = (
        "chunkbits",
        "dirents",
        "extended",
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
        "xattr_area",
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
    extended: bool
    xattr_area: tuple[int, int, list[int], bytes] | None
    nid: int

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
            raise TreeError(errno.ERANGE, f"cannot add xattr {key.decode()}", self.name)
        self.xattr_budget += entry
        xattrs[key] = value


def choose_version(tree: Tree, min_version: int = 0, max_version: int = 1) -> int:
    """§4: the base version, bumped to 1 when allowed and the tree holds a whiteout."""
    for v in (min_version, max_version):
        if not 0 <= v <= fmt.COMPOSEFS_VERSION_MAX:
            raise TreeError(errno.EINVAL, f"unsupported format version {v}")
    max_version = max(max_version, min_version)
    if min_version < 1 <= max_version:
        for inode in _home_inodes(tree):
            if inode.mode & S_IFMT == S_IFCHR and inode.rdev == 0:
                return 1
    return min_version


def _home_inodes(tree: Tree) -> Iterator[Inode]:
    stack = [tree.root]
    while stack:
        d = stack.pop()
        assert d.entries is not None
        for name, child in d.entries.items():
            if child.parent is d and child.name == name:
                yield child
                if child.entries is not None:
                    stack.append(child)


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


def _check_content(inode: Inode, name: bytes) -> None:
    """What the reference's node validation refuses (the dump parser already did most)."""
    payload = inode.payload
    if payload is not None and (len(payload) > PAYLOAD_MAX or b"\0" in payload):
        raise TreeError(errno.ENAMETOOLONG, "payload too long", name)
    content = inode.content
    if content is not None:
        if len(content) > INLINE_CONTENT_MAX:
            raise TreeError(errno.EINVAL, "inline content too large", name)
        if len(content) != inode.size:
            raise TreeError(errno.EINVAL, "content length differs from size", name)
    digest = inode.digest
    if digest is not None and len(digest) != DIGEST_SIZE:
        raise TreeError(errno.EINVAL, "digest must be 32 bytes", name)


def _make_node(inode: Inode, name: bytes, parent: _Node | None, version: int) -> _Node:
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
        _check_content(inode, name)
        if size > 0 and not inode.content:
            chunkbits = max((size - 1).bit_length(), fmt.BLOCK_BITS)
            if chunkbits > 43:
                chunkbits = 43  # §8.3: the chunk format field has 5 bits
            if -(-size // (1 << chunkbits)) > MAX_CHUNKS:
                raise TreeError(errno.EFBIG, path=name)
            n.chunkbits = chunkbits
            n.kind = KIND_EXTERNAL
            digest = inode.digest
            # No budget check needed: neither key can exist after escaping, and the two
            # entries are far below the budget.
            new = dict(xattrs)
            new[fmt.OVERLAY_METACOPY] = b"" if digest is None else _METACOPY_HEADER + digest
            if inode.payload:
                new[fmt.OVERLAY_REDIRECT] = b"/" + inode.payload
            n.xattrs = new
            n.plain_external = not xattrs
        else:
            n.kind = KIND_INLINE
    elif ftype == S_IFDIR:
        n.kind = KIND_DIR
    elif ftype == S_IFLNK:
        _check_content(inode, name)
        if not inode.payload:
            raise TreeError(errno.EINVAL, "symlink without target", name)
        n.kind = KIND_SYMLINK
        n.size = len(inode.payload)
    elif ftype == S_IFCHR and inode.rdev == 0 and parent is not None:
        # §5.4: store the whiteout escaped, as an empty regular file.
        n.kind = KIND_INLINE
        n.size = 0
        n.mode = S_IFREG | (mode & ~S_IFMT)
        n.set_xattr(fmt.OVERLAY_ESCAPED_WHITEOUT, b"")
        n.set_xattr(fmt.USER_OVERLAY_WHITEOUT, b"")
        parent.set_xattr(fmt.OVERLAY_ESCAPED_WHITEOUTS, b"")
        parent.set_xattr(fmt.USER_OVERLAY_WHITEOUTS, b"")
        if version >= 1:
            parent.set_xattr(fmt.OVERLAY_ESCAPED_OPAQUE, b"x")
            parent.set_xattr(fmt.USER_OVERLAY_OPAQUE, b"x")
    elif ftype in FILE_TYPES:
        n.kind = KIND_OTHER
    else:
        raise TreeError(errno.EINVAL, f"invalid mode {mode:o}", name)
    return n


def _stub(root: _Node, name: bytes) -> _Node:
    """§5.7: a real whiteout that hides the object store's ``xx`` directories."""
    r = root.inode
    inode = Inode(
        S_IFCHR | 0o644, uid=r.uid, gid=r.gid, mtime_sec=r.mtime_sec, mtime_nsec=r.mtime_nsec
    )
    n = _make_node(inode, name, None, 0)
    n.parent = root
    selinux = root.xattrs.get(b"security.selinux")
    if selinux is not None:
        n.set_xattr(b"security.selinux", selinux)
    return n


def _number(tree: Tree, version: int) -> list[_Node]:
    """§6.1: breadth-first inode order, rewriting each inode for overlayfs on the way (§5).

    Also adds ``.`` and ``..`` to every directory (§5.5), the root's opaque marker (§5.6)
    and the root whiteout stubs (§5.7), each where the reference puts it.
    """
    root = _make_node(tree.root, b"/", None, version)
    root.parent = root
    order = [root]
    by_inode: dict[int, _Node] = {id(tree.root): root}
    links: list[tuple[list[tuple[bytes, _Node]], int, Inode]] = []
    make = _make_node
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
                cn = make(child, name, node, version)
                by_inode[id(child)] = cn
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
_METACOPY_ENTRY = {
    size: fmt.XATTR_ENTRY.pack(len(_METACOPY_SUFFIX), fmt.EROFS_XATTR_INDEX_TRUSTED, size)
    + _METACOPY_SUFFIX
    for size in (0, fmt.METACOPY_SIZE)
}
_REDIRECT_ENTRY = bytes([len(_REDIRECT_SUFFIX), fmt.EROFS_XATTR_INDEX_TRUSTED])
_METACOPY_FILTER = 0xFFFFFFFF & ~_key_info(fmt.OVERLAY_METACOPY)[2]
_EXTERNAL_FILTER = _METACOPY_FILTER & ~_key_info(fmt.OVERLAY_REDIRECT)[2]


class _XattrEncoder:
    """The shared xattr table (§7.4) and each inode's xattr area (§7.3)."""

    def __init__(self, order: list[_Node]) -> None:
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for n in order:
            if n.xattrs:
                counts.update(n.xattrs.items())
        self.key_info: dict[bytes, tuple[int, bytes, int]] = {}
        self.keys_info: dict[tuple[bytes, ...], tuple[int, list[tuple[int, bytes]]]] = {}
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

    def external_area(self, xattrs: dict[bytes, bytes]) -> tuple[int, int, list[int], bytes]:
        """:meth:`area` for the common case of an external file whose only xattrs are the
        metacopy and (optionally) redirect ones the writer added."""
        table_offset = self.table_offset
        refs: list[int] = []
        metacopy = xattrs[fmt.OVERLAY_METACOPY]
        off = table_offset.get((fmt.OVERLAY_METACOPY, metacopy))
        if off is None:
            # 4 + 16 + 0 or 36 bytes: never needs padding
            body = _METACOPY_ENTRY[len(metacopy)] + metacopy
        else:
            refs.append(off)
            body = b""
        redirect = xattrs.get(fmt.OVERLAY_REDIRECT)
        if redirect is None:
            name_filter = _METACOPY_FILTER
        else:
            name_filter = _EXTERNAL_FILTER
            off = table_offset.get((fmt.OVERLAY_REDIRECT, redirect))
            if off is None:
                n = len(redirect)
                body += (
                    _REDIRECT_ENTRY + n.to_bytes(2, "little") + _REDIRECT_SUFFIX + redirect
                    + _PAD[(20 + n) & 3]
                )  # fmt: skip
            else:
                refs.append(off)
        return fmt.XATTR_IBODY_HEADER.size + 4 * len(refs) + len(body), name_filter, refs, body

    def area(self, xattrs: dict[bytes, bytes]) -> tuple[int, int, list[int], bytes]:
        """(size, name filter, shared table offsets, inline entries) of an xattr area."""
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
        body = b"".join(inline)
        return fmt.XATTR_IBODY_HEADER.size + 4 * len(refs) + len(body), name_filter, refs, body


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
    version = choose_version(tree, min_version, max_version)
    order = _number(tree, version)
    encoder = _XattrEncoder(order)
    area_of = encoder.area
    external_area = encoder.external_area

    # §6.3: minimum mtime and the ACL flag.
    min_mtime = min([(n.inode.mtime_sec, n.inode.mtime_nsec) for n in order])
    min_sec, min_nsec = min_mtime
    has_acl = any(
        b"system.posix_acl_access" in n.xattrs or b"system.posix_acl_default" in n.xattrs
        for n in order
        if n.xattrs
    )

    # §8 and §9: data layout, inode form, placement.
    pos = fmt.SUPERBLOCK_END
    n_data_blocks = 0
    for n in order:
        kind = n.kind
        n_blocks = tail = 0
        size = n.size
        if kind == KIND_DIR:
            n_blocks, tail = _layout_dir(n)
            size = n_blocks * BLOCK_SIZE + tail
            nlink = 2
            for name, child in n.dirents:
                if child.kind == KIND_DIR and child.parent is n and child.name == name:
                    nlink += 1
            n.nlink = nlink
        elif kind == KIND_EXTERNAL:
            tail = 4 * -(-size // (1 << n.chunkbits))
        elif kind == KIND_INLINE:
            if size:
                n_blocks, tail = divmod(size, BLOCK_SIZE)
                if tail > HALF_BLOCK:
                    n_blocks += 1
                    tail = 0
        elif kind == KIND_SYMLINK:
            tail = size
        inode = n.inode
        extended = (
            inode.mtime_sec != min_sec
            or inode.mtime_nsec != min_nsec
            or n.nlink > 0xFFFF
            or inode.uid > 0xFFFF
            or inode.gid > 0xFFFF
            or size > 0xFFFFFFFF
        )
        n.extended = extended
        meta = 64 if extended else 32
        if n.xattrs:
            area = external_area(n.xattrs) if n.plain_external else area_of(n.xattrs)
            n.xattr_area = area
            meta += area[0]
        else:
            n.xattr_area = None

        pos = (pos + 31) & ~31
        if kind == KIND_SYMLINK:
            total = meta + tail
            if total >= BLOCK_SIZE:
                n_blocks = 1
                tail = 0
            if pos // BLOCK_SIZE != (pos + total - 1) // BLOCK_SIZE:
                pos = round_up(pos, BLOCK_SIZE)
        elif tail:
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
        n.nid = pos >> 5
        n.n_blocks = n_blocks
        n.tail = tail
        pos += meta + tail
        n_data_blocks += n_blocks
    inodes_end = round_up(pos, fmt.SLOT_SIZE)
    data_start = round_up(inodes_end + len(encoder.table), BLOCK_SIZE)
    blocks = data_start // BLOCK_SIZE + n_data_blocks
    root_nid = order[0].nid
    if root_nid > 0xFFFF:
        raise TreeError(errno.EFBIG, "the root inode is beyond what the superblock addresses")

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
    image[inodes_end : inodes_end + len(encoder.table)] = encoder.table
    _emit(image, order, inodes_end % BLOCK_SIZE, data_start // BLOCK_SIZE)
    return bytes(image)


def _emit(image: bytearray, order: list[_Node], shared_base: int, blkaddr: int) -> None:
    """§10, §11: inodes with their xattrs and tails, then the data blocks."""
    pack_compact = fmt.INODE_COMPACT.pack_into
    pack_extended = fmt.INODE_EXTENDED.pack_into
    pack_header = fmt.XATTR_IBODY_HEADER.pack_into
    pack_ref = fmt.XATTR_SHARED_REF.pack_into
    layout_flat_inline = fmt.EROFS_INODE_FLAT_INLINE << 1
    layout_chunk = fmt.EROFS_INODE_CHUNK_BASED << 1
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
        inode = n.inode
        i_format = layout_flat_inline if tail else 0
        if kind == KIND_EXTERNAL:
            i_size = n.size
            i_u = (addr & 0xFFFF0000) | (n.chunkbits - fmt.BLOCK_BITS)
            i_format = layout_chunk
        elif kind == KIND_DIR:
            i_size = n_blocks * BLOCK_SIZE + tail
            i_u = addr
        elif kind == KIND_OTHER:
            i_size = 0
            i_u = inode.rdev & 0xFFFFFFFF if mode & S_IFMT in (S_IFCHR, S_IFBLK) else 0
        else:
            i_size = n.size
            i_u = addr
        area = n.xattr_area
        icount = (area[0] - 12) // 4 + 1 if area is not None else 0
        off = n.nid << 5
        if n.extended:
            pack_extended(
                image,
                off,
                i_format | 1,
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
                n.nlink,
            )
            off += 64
        else:
            pack_compact(
                image, off, i_format, icount, mode & 0xFFFF, n.nlink, i_size, 0, i_u, ino,
                inode.uid, inode.gid, 0,
            )  # fmt: skip
            off += 32
        if area is not None:
            _size, name_filter, refs, inline = area
            pack_header(image, off, name_filter, len(refs))
            off += 12
            for r in refs:
                pack_ref(image, off, (shared_base + r) >> 2)
                off += 4
            image[off : off + len(inline)] = inline
            off += len(inline)
        # the inline tail, then the data blocks
        if kind == KIND_DIR:
            dirents = n.dirents
            starts = [0, *n.split]
            ends = [*n.split, len(dirents)]
            for k in range(n_blocks):
                _write_dirents(image, (addr + k) * BLOCK_SIZE, dirents, starts[k], ends[k])
            if tail:
                _write_dirents(image, off, dirents, starts[-1], ends[-1])
        elif kind == KIND_EXTERNAL:
            if tail:
                image[off : off + tail] = b"\xff" * tail
            if n_blocks:
                image[addr * BLOCK_SIZE : (addr + 1) * BLOCK_SIZE] = b"\xff" * BLOCK_SIZE
        elif kind == KIND_INLINE:
            content = inode.content
            if content and i_size:
                if tail:
                    image[off : off + tail] = content[len(content) - tail :]
                if n_blocks:
                    data = content[: n_blocks * BLOCK_SIZE]
                    image[addr * BLOCK_SIZE : addr * BLOCK_SIZE + len(data)] = data
        elif kind == KIND_SYMLINK:
            target = inode.payload or b""
            if tail:
                image[off : off + tail] = target
            else:
                image[addr * BLOCK_SIZE : addr * BLOCK_SIZE + len(target)] = target


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
