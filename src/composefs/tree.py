"""The in-memory model of a filesystem tree that every source builds and every sink reads.

An :class:`Inode` holds the stat fields, the extended attributes and what the content is:
inline bytes (``content``), an external object (``payload`` naming the backing file, usually
``xx/<62 hex>``, plus its fs-verity ``digest``), a symlink target (``payload``), or nothing.
A directory's ``entries`` map ``bytes`` names to inodes.  Names, paths, xattr names and
values are ``bytes`` throughout: Linux names are bytes, not text.

Hardlinks are one :class:`Inode` object under several names.  The first name an inode is
added under is its *home* (``parent``/``name``): that is where the image writer places the
inode in its breadth-first numbering, exactly as the reference places a hardlink's target,
and every other name is written as a plain directory entry pointing at it.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterator

from composefs.errors import TreeError, XattrError

S_IFMT = stat.S_IFMT(0o177777)
S_IFREG = stat.S_IFREG
S_IFDIR = stat.S_IFDIR
S_IFLNK = stat.S_IFLNK
S_IFCHR = stat.S_IFCHR
S_IFBLK = stat.S_IFBLK
S_IFIFO = stat.S_IFIFO
S_IFSOCK = stat.S_IFSOCK
FILE_TYPES = frozenset({S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK})

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 0xFFFF
# Per-inode budget for xattrs from external input (the reference's
# LCFS_INODE_EXTERNAL_XATTR_MAX): each entry costs 7 + len(name) + len(value),
# plus 12 once for the header.
XATTR_BUDGET = 0x7FFF
XATTR_ENTRY_OVERHEAD = 7
XATTR_HEADER_OVERHEAD = 12
INLINE_CONTENT_MAX = 5000
PAYLOAD_MAX = 4095  # payloads and symlink targets are shorter than a block
DIGEST_SIZE = 32


def xattr_cost(name: bytes, value: bytes) -> int:
    """Budget cost of one xattr entry (see ``XATTR_BUDGET``)."""
    return XATTR_ENTRY_OVERHEAD + len(name) + len(value)


class Inode:
    """One file of the tree: stat fields, xattrs, and its content description."""

    __slots__ = (
        "content",
        "digest",
        "entries",
        "gid",
        "mode",
        "mtime_nsec",
        "mtime_sec",
        "name",
        "nlink",
        "parent",
        "payload",
        "rdev",
        "size",
        "uid",
        "xattrs",
    )

    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    mtime_sec: int
    mtime_nsec: int
    xattrs: dict[bytes, bytes]
    payload: bytes | None
    content: bytes | None
    digest: bytes | None
    entries: dict[bytes, Inode] | None
    parent: Inode | None
    name: bytes | None

    def __init__(
        self,
        mode: int,
        nlink: int = 1,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        size: int = 0,
        mtime_sec: int = 0,
        mtime_nsec: int = 0,
        xattrs: dict[bytes, bytes] | None = None,
        payload: bytes | None = None,
        content: bytes | None = None,
        digest: bytes | None = None,
    ) -> None:
        if mode & S_IFMT not in FILE_TYPES:
            raise TreeError(errno.EINVAL, f"invalid mode {mode:o}")
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = size
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        self.xattrs = {} if xattrs is None else xattrs
        self.payload = payload
        self.content = content
        self.digest = digest
        self.entries = {} if mode & S_IFMT == S_IFDIR else None
        self.parent = None
        self.name = None

    # -- type ---------------------------------------------------------------------------

    @property
    def file_type(self) -> int:
        return self.mode & S_IFMT

    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    def is_whiteout(self) -> bool:
        """An overlayfs whiteout: a character device with device number 0/0."""
        return self.mode & S_IFMT == S_IFCHR and self.rdev == 0

    # -- directory entries ------------------------------------------------------------------

    def add(self, name: bytes, child: Inode) -> Inode:
        """Add ``child`` under ``name``; the first name an inode gets is its home."""
        entries = self.entries
        if entries is None:
            raise TreeError(errno.ENOTDIR, path=name)
        check_name(name)
        if name in entries:
            raise TreeError(errno.EEXIST, path=name)
        entries[name] = child
        if child.parent is None:
            child.parent = self
            child.name = name
        return child

    def is_home_of(self, name: bytes, child: Inode) -> bool:
        """Whether ``name`` in this directory is ``child``'s home (not a further hardlink)."""
        return child.parent is self and child.name == name

    def path(self) -> bytes:
        """The absolute path of this inode's home (following ``parent`` to the root)."""
        names: list[bytes] = []
        node = self
        while node.parent is not None and node.parent is not node:
            names.append(node.name or b"")
            node = node.parent
        return b"/" + b"/".join(reversed(names))

    def lookup(self, path: bytes) -> Inode | None:
        """Resolve a ``/``-separated path below this directory (no symlinks followed)."""
        node: Inode | None = self
        for part in path.split(b"/"):
            if not part:
                continue
            if node is None or node.entries is None:
                return None
            node = node.entries.get(part)
        return node

    # -- xattrs -----------------------------------------------------------------------------

    def set_xattr(self, name: bytes, value: bytes) -> None:
        """Set an xattr with the reference's limits for external input.

        Names are 1..255 bytes without NUL, values at most 65535 bytes, and all xattrs of
        one inode together stay within ``XATTR_BUDGET``.
        """
        # an int operand: a bytes one makes `in` try it as an int first and clear a TypeError
        if not name or len(name) > XATTR_NAME_MAX or 0 in name:
            raise XattrError(f"invalid xattr name {name!r}")
        if len(value) > XATTR_VALUE_MAX:
            raise XattrError(f"xattr value of {len(value)} bytes is too long", err=errno.EINVAL)
        xattrs = self.xattrs
        cost = sum(xattr_cost(k, v) for k, v in xattrs.items() if k != name)
        cost += xattr_cost(name, value) + XATTR_HEADER_OVERHEAD
        if cost > XATTR_BUDGET:
            raise XattrError(f"xattrs need {cost} bytes, more than {XATTR_BUDGET}")
        xattrs[name] = value

    def __repr__(self) -> str:
        return f"<Inode {self.mode:o} size={self.size} name={self.name!r}>"


def check_name(name: bytes) -> None:
    if not name or len(name) > NAME_MAX or 0x2F in name or 0 in name or name in (b".", b".."):
        raise TreeError(errno.EINVAL, f"invalid file name {name!r}")


class Tree:
    """A filesystem tree: a root directory inode and helpers over it."""

    __slots__ = ("root",)

    def __init__(self, root: Inode) -> None:
        if not root.is_dir():
            raise TreeError(errno.ENOTDIR, "the root must be a directory")
        root.parent = root
        root.name = b""
        self.root = root

    def lookup(self, path: bytes) -> Inode | None:
        return self.root.lookup(path)

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every name in the tree, depth-first in name order, as (path, inode).

        The root comes first as ``b"/"``.  A hardlinked inode appears once per name;
        directories are descended only under their home name.
        """
        yield b"/", self.root
        root_entries = self.root.entries
        assert root_entries is not None
        stack: list[tuple[bytes, Inode, Iterator[bytes]]] = [
            (b"", self.root, iter(sorted(root_entries)))
        ]
        while stack:
            prefix, directory, names = stack[-1]
            entries = directory.entries
            assert entries is not None
            for name in names:
                child = entries[name]
                path = prefix + b"/" + name
                yield path, child
                if child.entries is not None and directory.is_home_of(name, child):
                    stack.append((path, child, iter(sorted(child.entries))))
                    break
            else:
                stack.pop()
