"""What the FUSE server answers: a composefs image seen as the kernel mount shows it.

The tree is the image's, read lazily through :class:`composefs.erofs.reader.Image`, with
what overlayfs does on top of EROFS done here instead:

* whiteouts (character devices 0/0: the root's ``00``..``ff`` stubs) are not there;
* ``trusted.overlay.*`` xattrs are overlayfs' own and hidden; escaped ones
  (``trusted.overlay.overlay.X``) are shown unescaped (``trusted.overlay.X``), so an
  escaped whiteout is an empty file carrying ``trusted.overlay.whiteout``, as in the
  kernel mount; ``trusted.*`` is listed to root only;
* a file with a redirect is read from its object, checked (see :mod:`.verify`).

With ``metadata_only`` the server is the lower layer of an overlayfs instead (see
:mod:`composefs.rootless`): files with an object are placeholders of the right size whose
content overlayfs reads from the object itself, following their redirect; overlayfs' own
xattrs are shown in the ``user.overlay.`` namespace that overlayfs reads when mounted with
``userxattr`` (and the image's own ``user.overlay.*`` escaped, so that overlayfs shows them
and does not act on them).  Each object is checked once, when overlayfs first asks for a
file's redirect, before it can read anything from it.

FUSE node ids are EROFS nids + 2 (FUSE reserves 1 for the root, 0 for "none"); inode
numbers are the nids, so they are stable across mounts and shared by hardlinks.  Attributes
and entries never change, so the kernel may cache them for a long time.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from composefs.erofs import format as fmt
from composefs.erofs.reader import Image, ImageInode
from composefs.errors import FormatError
from composefs.fuse import protocol as p
from composefs.fuse.verify import (
    BlockHashCache,
    ObjectDirs,
    ServedObject,
    check_object_once,
    open_object,
)
from composefs.tree import S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG

TIMEOUT = 86400  # seconds the kernel may cache entries and attributes: nothing changes
_OVERLAY = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."
_TRUSTED = b"trusted."
_USER_OVERLAY = b"user.overlay."
_USER_ESCAPED = b"user.overlay.overlay."
# what overlayfs reads before it follows a file into its object
_REDIRECT_NAMES = (b"user.overlay.metacopy", b"user.overlay.redirect")
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_DT = {
    stat.S_IFDIR: 4, stat.S_IFREG: 8, stat.S_IFLNK: 10, stat.S_IFCHR: 2, stat.S_IFBLK: 6,
    stat.S_IFIFO: 1, stat.S_IFSOCK: 12,
}  # fmt: skip
_NEGATIVE = p.ENTRY_OUT_HEAD.pack(0, 0, TIMEOUT, 0, 0, 0) + bytes(p.ATTR.size)
_NO_ENTRY = bytes(p.ENTRY_OUT_HEAD.size + p.ATTR.size)
_ENTRY_HEAD = p.ENTRY_OUT_HEAD.pack
_ATTR_OUT_HEAD = p.ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0)
_HIDDEN = -1  # the kind of a whiteout in the index
_PASSED_THROUGH = 0  # the file handle of every passed-through open (others count from 1)
_NO_HANDLE = 0  # ... and of reads of files the kernel opened without asking
_PADDING = [bytes(-i % 8) for i in range(8)]


_Xattrs = tuple[tuple[bytes, bytes], ...]


class _Directory(NamedTuple):
    """The entries a directory shows, in on-disk (name) order, "." and ".." included."""

    names: list[bytes]
    nids: list[int]
    types: list[int]  # DT_* for readdir


class FuseOptions(NamedTuple):
    verify: bool = True  # check object content against the image's digests
    acl: bool = True  # serve POSIX ACLs when the image has them (off: the noacl option)
    passthrough: bool = True  # let the kernel read trusted objects directly (root only)
    # The lower layer of an overlayfs mounted with userxattr: placeholders for files with
    # an object, overlayfs' xattrs as user.overlay.*; overlayfs reads the content.
    metadata_only: bool = False
    # (metadata_only) overlayfs checks each object's fs-verity digest (verity=require):
    # nothing to check here
    kernel_verity: bool = False
    # (metadata_only) accept objects that someone other than this user or root can change
    # (they are checked once, and read unchecked by the kernel afterwards)
    foreign_objects: bool = False


class _Served:
    """An object kept open for an inode, with its passthrough registration."""

    __slots__ = ("backing_id", "handles", "nid", "obj", "open_reply")

    def __init__(self, nid: int, obj: ServedObject, backing_id: int) -> None:
        self.nid = nid
        self.obj = obj
        self.backing_id = backing_id  # non-zero: the kernel reads the object itself
        self.handles = 0
        # No handle: reads go to the kernel; release finds the object by inode.
        self.open_reply = (
            p.OPEN_OUT.pack(_PASSED_THROUGH, p.FOPEN_PASSTHROUGH, backing_id) if backing_id else b""
        )


class _OpenFile(NamedTuple):
    """A file opened through us (when objects are passed through)."""

    nid: int
    size: int
    data: bytes | None = None  # inline content; None with no object: a file of holes
    served: _Served | None = None


_KEPT_PASSTHROUGH = 1 << 18  # passed-through objects kept (no fd: a few hundred bytes)


def _raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (as servers do); return how
    many idle objects to keep open: half of it, at most 65536."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(64, min(65536, soft // 2))


class Filesystem:
    """Request handlers; each takes the request's node id and body and returns the reply
    body, or raises OSError with the errno to answer."""

    def __init__(
        self, image: Image, basedirs: list[str], options: FuseOptions | None = None
    ) -> None:
        self.image = image
        options = options or FuseOptions()
        if options.metadata_only:
            options = options._replace(passthrough=False)  # overlayfs reads the objects
        self.options = options
        self.objects = ObjectDirs(basedirs)
        self.root_nid = image.header.root_nid
        self.acl = options.acl and image.header.has_acl
        self.block_hashes = BlockHashCache()
        self._lock = threading.Lock()
        self._attrs: dict[int, bytes] = {}
        self._dirs: dict[int, _Directory] = {}
        self._by_name: OrderedDict[int, dict[bytes, int]] = OrderedDict()
        self._xattrs: dict[int, _Xattrs] = {}
        self._xattr_sets: dict[_Xattrs, _Xattrs] = {}
        # metadata_only: the placeholders (files overlayfs follows into an object), those
        # whose object was checked, and the objects checked (by path and digest)
        self._placeholders: dict[int, int] = {}  # nid: size
        self._exposed: set[int] = set()
        self._checked: set[tuple[bytes, bytes | None]] = set()
        self._checking: dict[tuple[bytes, bytes | None], threading.Lock] = {}
        self._gated = options.metadata_only and options.verify and not options.kernel_verity
        self._index()
        self._files: dict[int, _OpenFile] = {}
        self._next_fh = 1
        self._objects: OrderedDict[int, _Served] = OrderedDict()
        self._kept_objects = _raise_fd_limit()  # idle objects kept open for the next open
        self._kept_fds = 0
        self._backing_files: dict[int, tuple[bytes | None, bytes | None]] = {}
        # Set by the session when the kernel agreed to passthrough: registers an fd with
        # /dev/fuse and returns its backing id.
        self.backing_open: Callable[[int], int] | None = None
        self.backing_close: Callable[[int], None] | None = None

    def close(self) -> None:
        self.objects.close()
        for served in self._objects.values():
            served.obj.close()
        self._objects.clear()
        self._files.clear()

    # -- the index -------------------------------------------------------------------------

    def _index(self) -> None:
        """Walk the whole image once: check every structure a request could touch (so a
        malformed image is refused before mounting, with the reader's error) and keep
        each inode's attributes and each directory's visible entries, so that requests
        are answered without parsing (about 250 bytes per entry).

        Each directory is read once and may be reached once; their data may not add up to
        more than the image, so overlapping directories cannot multiply the work.
        """
        image = self.image
        root = image.inode(self.root_nid)
        if not root.is_dir():
            raise _malformed(image, f"the root inode {root.nid} is not a directory")
        self._attrs[root.nid] = self._check(root)
        # file type of every inode met, and whether it is hidden (a whiteout)
        kinds: dict[int, int] = {root.nid: 4}
        stack = [root]
        budget = image.size
        while stack:
            ino = stack.pop()
            budget -= ino.size
            if budget < 0:
                raise _malformed(image, "directories overlap (more entries than the image holds)")
            names: list[bytes] = []
            nids: list[int] = []
            types: list[int] = []
            previous = b""
            for name, child, _ftype in image.iterdir(ino):
                if name <= previous:
                    # the kernel looks names up by binary search: they must be sorted
                    raise _malformed(
                        image, f"directory {ino.nid}: entries out of order at {name!r}"
                    )
                previous = name
                if name == b"." or name == b"..":
                    names.append(name)
                    nids.append(child)
                    types.append(4)
                    continue
                kind = kinds.get(child)
                if kind is None:
                    child_ino = image.inode(child)
                    self._attrs[child] = self._check(child_ino)
                    ftype = child_ino.mode & S_IFMT
                    kind = kinds[child] = (
                        _HIDDEN if ftype == S_IFCHR and child_ino.i_u == 0 else _DT.get(ftype, 0)
                    )
                    if ftype == S_IFDIR:
                        stack.append(child_ino)
                elif kind == 4:
                    raise _malformed(image, f"directory {child} is reached twice (from {ino.nid})")
                if kind == _HIDDEN:
                    continue  # a whiteout: overlayfs hides those of its lowest layer
                names.append(name)
                nids.append(child)
                types.append(kind)
            self._dirs[ino.nid] = _Directory(names, nids, types)

    def _check(self, ino: ImageInode) -> bytes:
        """Read everything of an inode a request may ask for (raising on anything
        malformed) and return its attributes, packed."""
        image = self.image
        ftype = ino.mode & S_IFMT
        raw = image.raw_xattrs(ino)
        if raw:
            visible = self._visible_xattrs(raw)
            if visible:
                self._xattrs[ino.nid] = visible
                if (
                    self.options.metadata_only
                    and ftype == S_IFREG
                    and any(key == _REDIRECT_NAMES[1] for key, _value in visible)
                ):
                    self._placeholders[ino.nid] = ino.size
        if ftype == S_IFLNK:
            image.readlink(ino)
        elif ftype == S_IFREG and ino.size and ino.layout != fmt.EROFS_INODE_CHUNK_BASED:
            image.read_data(ino, ino.size)
        elif ftype == S_IFDIR and ino.layout == fmt.EROFS_INODE_CHUNK_BASED:
            raise _malformed(
                image, f"directory {ino.nid} has a chunk-based layout", ino.tail_offset
            )
        size = ino.size
        mtime = ino.mtime_sec & 0xFFFF_FFFF_FFFF_FFFF  # signed: the kernel reads it back so
        return p.ATTR.pack(
            ino.nid, size, (size + 511) // 512, mtime, mtime, mtime,
            ino.mtime_nsec, ino.mtime_nsec, ino.mtime_nsec, ino.mode, ino.nlink, ino.uid,
            ino.gid, ino.rdev, 4096, 0,
        )  # fmt: skip

    def _nid(self, nodeid: int) -> int:
        return self.root_nid if nodeid == p.ROOT_ID else nodeid - 2

    def _nodeid(self, nid: int) -> int:
        return p.ROOT_ID if nid == self.root_nid else nid + 2

    def _attr(self, nid: int) -> bytes:
        attr = self._attrs.get(nid)
        if attr is None:
            raise OSError(errno.ENOENT, "no such node")  # not from this image: a stale id
        return attr

    def _entry(self, nid: int) -> bytes:
        return _ENTRY_HEAD(self._nodeid(nid), 0, TIMEOUT, TIMEOUT, 0, 0) + self._attr(nid)

    def _directory(self, nid: int) -> _Directory:
        directory = self._dirs.get(nid)
        if directory is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        return directory

    def _children(self, nid: int) -> dict[bytes, int]:
        """A directory's entries by name, made on its first lookup and kept for a while."""
        with self._lock:
            by_name = self._by_name.get(nid)
            if by_name is not None:
                self._by_name.move_to_end(nid)
                return by_name
        directory = self._directory(nid)
        by_name = dict(zip(directory.names, directory.nids, strict=True))
        by_name.pop(b".", None)  # not always first: "-" sorts before "."
        by_name.pop(b"..", None)
        with self._lock:
            self._by_name[nid] = by_name
            while len(self._by_name) > 1024:
                self._by_name.popitem(last=False)
        return by_name

    # -- requests ------------------------------------------------------------------------

    def lookup(self, nodeid: int, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0]
        child = self._children(self._nid(nodeid)).get(name)
        if child is None:
            return _NEGATIVE  # a cached negative entry: the kernel will not ask again
        return self._entry(child)

    def getattr(self, nodeid: int, _body: memoryview) -> bytes:
        return _ATTR_OUT_HEAD + self._attr(self._nid(nodeid))

    def readlink(self, nodeid: int, _body: memoryview) -> bytes:
        ino = self.image.inode(self._nid(nodeid))
        if ino.mode & S_IFMT != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return self.image.readlink(ino)

    def open(self, nodeid: int, body: memoryview) -> bytes:
        if self.backing_open is None:
            # Reads come here, so an open has nothing to set up: "not implemented" makes
            # the kernel open files without asking (and without a release), keep their
            # cached pages across opens, and send reads by inode (see read()).  A warm
            # walk of the tree then costs no request at all.  (The mount is read-only:
            # the kernel refuses writers itself.)
            raise OSError(errno.ENOSYS, "opens are not needed")
        flags, _open_flags = p.OPEN_IN.unpack_from(body)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only")
        nid = self._nid(nodeid)
        served = self._object(nid)
        if served is None:
            ino, payload, digest = self._regular_file(nid)
            if payload is None:
                handle = _OpenFile(nid, ino.size, data=self._inline_content(ino))
                return p.OPEN_OUT.pack(self._add_handle(handle), p.FOPEN_KEEP_CACHE, 0)
            served = self._open_object(nid, payload, ino.size, digest)
        if served.backing_id:
            return served.open_reply
        fh = self._add_handle(_OpenFile(nid, served.obj.size, served=served))
        return p.OPEN_OUT.pack(fh, p.FOPEN_KEEP_CACHE, 0)

    def open_passed_through(self, nodeid: int) -> bytes | None:
        """The reply to a read-only open of a node whose object is kept and passed
        through, the open counted; None when the open needs :meth:`open`.

        This is most of what a warm walk of the tree asks (an open and a release per
        file), so it is answered with as little work as can be."""
        with self._lock:
            served = self._objects.get(nodeid - 2)  # (the root is no file: -1 is not there)
            if served is None or not served.backing_id:
                return None
            served.handles += 1
            return served.open_reply

    def release_passed_through(self, nodeid: int) -> None:
        """A release of a passed-through open (file handle 0)."""
        with self._lock:
            served = self._objects.get(nodeid - 2)
            if served is not None:
                served.handles -= 1

    def _regular_file(self, nid: int) -> tuple[ImageInode, bytes | None, bytes | None]:
        """A regular file's inode, object path and digest (both None for inline content)."""
        ino = self.image.inode(nid)
        if ino.mode & S_IFMT != S_IFREG:
            raise OSError(errno.EISDIR if ino.is_dir() else errno.EINVAL, "not a file")
        known = self._backing_files.get(nid)
        if known is None:
            known = self._backing_files[nid] = self.image.backing_file(ino)
        return ino, known[0], known[1]

    def _inline_content(self, ino: ImageInode) -> bytes | None:
        """The content stored in the image, or None for a file of holes."""
        if ino.layout == fmt.EROFS_INODE_CHUNK_BASED:
            return None if ino.size else b""
        return self.image.read_data(ino, ino.size)

    def _open_object(self, nid: int, payload: bytes, size: int, digest: bytes | None) -> _Served:
        obj = open_object(
            self.objects, payload, size, digest, verify=self.options.verify,
            cache=self.block_hashes,
        )  # fmt: skip
        return self._keep_object(nid, obj)

    def has_kept_object(self, nodeid: int) -> bool:
        """Whether opening this node is quick: its object is kept open, or it is known to
        have none (content inline)."""
        return self._content_at_hand(self._nid(nodeid))

    def _content_at_hand(self, nid: int) -> bool:
        if nid in self._objects:
            return True
        known = self._backing_files.get(nid)
        return known is not None and known[0] is None

    def _object(self, nid: int) -> _Served | None:
        """The object already open for this inode (counted as used once more), if any."""
        with self._lock:
            served = self._objects.get(nid)
            if served is not None:
                served.handles += 1
            return served

    def _keep_object(self, nid: int, obj: ServedObject) -> _Served:
        """Keep an object for later opens of its inode (opening and checking it again is
        most of an open's cost), with its passthrough registration if it gets one.

        A passed-through object needs no fd of ours: the kernel holds the file for its
        backing id, so those are kept by the hundred thousand; objects read through us
        keep an fd, within half the open-file limit.
        """
        fresh = _Served(nid, obj, self._passthrough(obj))
        if fresh.backing_id:
            obj.close()
        with self._lock:
            served = self._objects.setdefault(nid, fresh)
            served.handles += 1
            if served is fresh and obj.fd >= 0:
                self._kept_fds += 1
            evicted = []
            if len(self._objects) > _KEPT_PASSTHROUGH or self._kept_fds > self._kept_objects:
                need_fd = self._kept_fds > self._kept_objects
                # Drop the most recently kept idle object but this one: a walk over more
                # files than are kept (tar, a backup) then still finds the first ones
                # next time, where dropping the oldest would miss every single time.
                for old in reversed(self._objects.values()):
                    if old.handles or old is served or (need_fd and old.obj.fd < 0):
                        continue
                    evicted.append(old)
                    del self._objects[old.nid]
                    if old.obj.fd >= 0:
                        self._kept_fds -= 1
                    break
        if served is not fresh:
            evicted.append(fresh)  # another thread opened it meanwhile: keep theirs
        for old in evicted:
            if old.backing_id and self.backing_close is not None:
                self.backing_close(old.backing_id)
            old.obj.close()
        return served

    def _passthrough(self, obj: ServedObject) -> int:
        """A backing id for the kernel to read ``obj`` itself, or 0 to serve reads here.

        Passing through gives native reads and one page cache with every other mount of
        the object, but the kernel then reads the file without us: only objects whose
        every read stays checked qualify.  That is an object with kernel fs-verity, or one
        fully checked against its digest that only root can change (the server runs as
        root to pass through at all).  The kernel wants one backing file per inode: the
        object kept per inode gives that.
        """
        if self.backing_open is None or not obj.trusted_for_passthrough():
            return 0
        try:
            return self.backing_open(obj.fd)
        except OSError:
            return 0  # e.g. an object store on a stacked filesystem: too deep

    def _add_handle(self, handle: _OpenFile) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = handle
        return fh

    def read(self, nodeid: int, body: memoryview) -> bytes:
        fh, offset, size, *_rest = p.READ_IN.unpack_from(body)
        if fh == _NO_HANDLE:
            return self._read_inode(self._nid(nodeid), offset, size)
        handle = self._files.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")
        served = handle.served
        if served is not None:
            if served.obj.fd < 0:  # passed through: the kernel reads it, not us
                raise OSError(errno.EIO, "read of a passed-through file")
            return served.obj.read(offset, size)
        return _inline_read(handle.data, handle.size, offset, size)

    def _read_inode(self, nid: int, offset: int, size: int) -> bytes:
        """A read of a file opened without us: its object is opened (and checked) at the
        first read and kept; it counts as in use for the time of each read."""
        served = self._object(nid)
        if served is None:
            ino, payload, digest = self._regular_file(nid)
            if payload is None:
                return _inline_read(self._inline_content(ino), ino.size, offset, size)
            if self.options.metadata_only:
                # overlayfs reads the object; only a process bypassing it gets here
                raise OSError(errno.EIO, "a placeholder: the content is in its object")
            served = self._open_object(nid, payload, ino.size, digest)
        try:
            return served.obj.read(offset, size)
        finally:
            with self._lock:
                served.handles -= 1

    def read_needs_object(self, nodeid: int, body: memoryview) -> bool:
        """Whether this read must first open (and perhaps hash) its object."""
        if p.READ_IN.unpack_from(body)[0] != _NO_HANDLE or self.options.metadata_only:
            return False
        return not self._content_at_hand(self._nid(nodeid))

    def getxattr_needs_object(self, nodeid: int, at_least: int = 0) -> bool:
        """Whether a getxattr must first check an object (metadata_only) of ``at_least``
        bytes."""
        nid = self._nid(nodeid)
        return (
            self._gated and self._placeholders.get(nid, -1) >= at_least
            and nid not in self._exposed
        )  # fmt: skip

    def _expose(self, nid: int) -> None:
        """Check a placeholder's object before overlayfs may follow it: once per object
        (path and digest), concurrent first checks of one object hashing it once."""
        ino, payload, digest = self._regular_file(nid)
        if payload is None:
            self._exposed.add(nid)
            return
        key = (payload, digest)
        if key not in self._checked:
            with self._lock:
                lock = self._checking.setdefault(key, threading.Lock())
            with lock:
                if key not in self._checked:
                    check_object_once(
                        self.objects, payload, ino.size, digest,
                        foreign=self.options.foreign_objects,
                    )  # fmt: skip
                    self._checked.add(key)
            with self._lock:
                self._checking.pop(key, None)
        self._exposed.add(nid)

    def release(self, nodeid: int, body: memoryview) -> bytes:
        fh = p.RELEASE_IN.unpack_from(body)[0]
        if fh == _PASSED_THROUGH:
            self.release_passed_through(nodeid)
            return b""
        with self._lock:
            handle = self._files.pop(fh, None)
            if handle is not None and handle.served is not None:
                handle.served.handles -= 1  # stays open, for the next open of the inode
        return b""

    def readdir(self, nodeid: int, body: memoryview, plus: bool = False) -> bytes:
        _fh, offset, size, *_rest = p.READ_IN.unpack_from(body)
        directory = self._directory(self._nid(nodeid))
        names, nids, types = directory
        out = []
        used = 0
        pack = p.DIRENT_HEAD.pack
        for index in range(offset, len(names)):
            name = names[index]
            namelen = len(name)
            record = pack(nids[index], index + 1, namelen, types[index]) + name
            record += _PADDING[(p.DIRENT_HEAD.size + namelen) % 8]
            if plus:
                # node id 0 means "nothing to instantiate", what "." and ".." want
                dot = name == b"." or name == b".."
                record = (_NO_ENTRY if dot else self._entry(nids[index])) + record
            used += len(record)
            if used > size:
                break
            out.append(record)
        return b"".join(out)

    def readdirplus(self, nodeid: int, body: memoryview) -> bytes:
        return self.readdir(nodeid, body, plus=True)

    def _visible_xattrs(self, raw: list[tuple[bytes, bytes]]) -> _Xattrs:
        """The xattrs a user of the kernel mount sees, from the stored ones; interned, as
        many inodes carry the same set (an SELinux label, say)."""
        out = []
        metadata_only = self.options.metadata_only
        for key, value in raw:
            if key.startswith(_OVERLAY):
                if key.startswith(_ESCAPED):
                    # shown unescaped, as the kernel mount does (overlayfs with userxattr
                    # leaves trusted.* alone)
                    key = _OVERLAY + key[len(_ESCAPED) :]
                elif metadata_only:
                    # overlayfs' own (redirect, metacopy...), for overlayfs with userxattr
                    key = _USER_OVERLAY + key[len(_OVERLAY) :]
                else:
                    continue  # overlayfs' own: redirect, metacopy, opaque...
            elif metadata_only and key.startswith(_USER_OVERLAY):
                # the image's own: escaped, so that overlayfs shows it unescaped and does
                # not take it for one of its own (a whiteout, an opaque directory...)
                key = _USER_ESCAPED + key[len(_USER_OVERLAY) :]
            if key in _ACL_NAMES and not self.acl:
                continue
            out.append((bytes(key), bytes(value)))
        visible = tuple(out)
        return self._xattr_sets.setdefault(visible, visible)

    def getxattr(self, nodeid: int, body: memoryview, uid: int) -> bytes:
        size = p.GETXATTR_IN.unpack_from(body)[0]
        name = bytes(body[p.GETXATTR_IN.size :]).split(b"\0", 1)[0]
        if name in _ACL_NAMES and not self.acl:
            raise OSError(errno.EOPNOTSUPP, "no ACLs in this image (or noacl)")
        # (trusted.* needs CAP_SYS_ADMIN: the kernel checks before asking)
        nid = self._nid(nodeid)
        if name in _REDIRECT_NAMES and self.getxattr_needs_object(nodeid):
            self._expose(nid)  # raises (EIO, ENOENT) for an object that fails
        for key, value in self._xattrs.get(nid, ()):
            if key == name:
                return _sized(value, size)
        raise OSError(errno.ENODATA, "no such attribute")

    def listxattr(self, nodeid: int, body: memoryview, uid: int) -> bytes:
        size = p.GETXATTR_IN.unpack_from(body)[0]
        names = b"".join(
            key + b"\0"
            for key, _value in self._xattrs.get(self._nid(nodeid), ())
            if uid == 0 or not key.startswith(_TRUSTED)  # as listxattr on the kernel mount
        )
        return _sized(names, size)

    def statfs(self, _nodeid: int, _body: memoryview) -> bytes:
        blocks = self.image.size // 4096
        inodes = self.image.header.inos
        return p.KSTATFS.pack(blocks, 0, 0, inodes, 0, 4096, 255, 4096, 0)


def _malformed(image: Image, message: str, offset: int | None = None) -> FormatError:
    return FormatError(f"{image.name}: {message}", offset=offset)


def _inline_read(data: bytes | None, file_size: int, offset: int, size: int) -> bytes:
    """A read of content stored in the image; ``data`` None is a file of holes."""
    if data is None:
        return bytes(max(0, min(offset + size, file_size) - offset))
    return data[offset : offset + size]


def _sized(value: bytes, size: int) -> bytes:
    """getxattr/listxattr: the size alone when asked with size 0, else the value."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value
