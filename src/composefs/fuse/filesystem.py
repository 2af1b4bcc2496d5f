"""What the FUSE server answers: a composefs image seen as the kernel mount shows it.

The tree is the image's, read lazily through :class:`composefs.erofs.reader.Image`, with
what overlayfs does on top of EROFS done here instead:

* whiteouts (character devices 0/0: the root's ``00``..``ff`` stubs) are not there;
* ``trusted.overlay.*`` xattrs are overlayfs' own and hidden; escaped ones
  (``trusted.overlay.overlay.X``) are shown unescaped (``trusted.overlay.X``), so an
  escaped whiteout is an empty file carrying ``trusted.overlay.whiteout``, as in the
  kernel mount; ``trusted.*`` is listed to root only;
* a file with a redirect is read from its object, checked (see :mod:`.verify`).

FUSE node ids are EROFS nids + 2 (FUSE reserves 1 for the root, 0 for "none"); inode
numbers are the nids, so they are stable across mounts and shared by hardlinks.  Attributes
and entries never change, so the kernel may cache them for a long time.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from composefs.erofs import format as fmt
from composefs.erofs.reader import Image, ImageInode
from composefs.fuse import protocol as p
from composefs.fuse.verify import BlockHashCache, ServedObject, open_object
from composefs.tree import S_IFMT

TIMEOUT = 86400  # seconds the kernel may cache entries and attributes: nothing changes
_OVERLAY = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."
_TRUSTED = b"trusted."
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_DT = {
    stat.S_IFDIR: 4, stat.S_IFREG: 8, stat.S_IFLNK: 10, stat.S_IFCHR: 2, stat.S_IFBLK: 6,
    stat.S_IFIFO: 1, stat.S_IFSOCK: 12,
}  # fmt: skip
_NEGATIVE = p.ENTRY_OUT_HEAD.pack(0, 0, TIMEOUT, 0, 0, 0) + bytes(p.ATTR.size)
_NO_ENTRY = bytes(p.ENTRY_OUT_HEAD.size + p.ATTR.size)


class FuseOptions(NamedTuple):
    verify: bool = True  # check object content against the image's digests
    acl: bool = True  # serve POSIX ACLs when the image has them (off: the noacl option)
    passthrough: bool = True  # let the kernel read trusted objects directly (root only)


class _OpenFile(NamedTuple):
    nid: int
    obj: ServedObject | None  # None: content inline in the image (or a hole)
    data: bytes | None
    backing_id: int  # non-zero: the kernel reads the object itself (passthrough)


class Filesystem:
    """Request handlers; each takes the request's node id and body and returns the reply
    body, or raises OSError with the errno to answer."""

    def __init__(
        self, image: Image, basedirs: list[str], options: FuseOptions | None = None
    ) -> None:
        self.image = image
        self.options = options = options or FuseOptions()
        self.basedir_fds = [
            (d, os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) for d in basedirs
        ]
        self.root_nid = image.header.root_nid
        self.acl = options.acl and image.header.has_acl
        self.block_hashes = BlockHashCache()
        self._lock = threading.Lock()
        self._inodes: dict[int, ImageInode] = {}
        self._entries: OrderedDict[int, tuple[dict[bytes, int], list[tuple[bytes, int, int]]]]
        self._entries = OrderedDict()
        self._files: dict[int, _OpenFile] = {}
        self._next_fh = 1
        self._backing: dict[int, tuple[int, int]] = {}  # nid -> (backing id, open count)
        # Set by the session when the kernel agreed to passthrough: registers an fd with
        # /dev/fuse and returns its backing id.
        self.backing_open: Callable[[int], int] | None = None
        self.backing_close: Callable[[int], None] | None = None

    def close(self) -> None:
        for _d, fd in self.basedir_fds:
            os.close(fd)
        self.basedir_fds = []
        for f in self._files.values():
            if f.obj is not None:
                f.obj.close()
        self._files.clear()

    # -- inodes --------------------------------------------------------------------------

    def _nid(self, nodeid: int) -> int:
        return self.root_nid if nodeid == p.ROOT_ID else nodeid - 2

    def _nodeid(self, nid: int) -> int:
        return p.ROOT_ID if nid == self.root_nid else nid + 2

    def inode(self, nid: int) -> ImageInode:
        ino = self._inodes.get(nid)
        if ino is None:
            ino = self.image.inode(nid)
            if len(self._inodes) > 1 << 20:
                self._inodes.clear()  # a crude bound; the kernel caches what is hot anyway
            self._inodes[nid] = ino
        return ino

    def _attr(self, ino: ImageInode) -> bytes:
        mode = ino.mode
        size = ino.size
        return p.ATTR.pack(
            ino.nid, size, (size + 511) // 512, ino.mtime_sec, ino.mtime_sec, ino.mtime_sec,
            ino.mtime_nsec, ino.mtime_nsec, ino.mtime_nsec, mode, ino.nlink, ino.uid,
            ino.gid, ino.rdev, 4096, 0,
        )  # fmt: skip

    def _entry(self, nid: int) -> bytes:
        return p.ENTRY_OUT_HEAD.pack(self._nodeid(nid), 0, TIMEOUT, TIMEOUT, 0, 0) + self._attr(
            self.inode(nid)
        )

    def _directory(self, nid: int) -> tuple[dict[bytes, int], list[tuple[bytes, int, int]]]:
        """A directory's visible entries, by name and in order (``.``/``..`` first)."""
        with self._lock:
            cached = self._entries.get(nid)
            if cached is not None:
                self._entries.move_to_end(nid)
                return cached
        ino = self.inode(nid)
        if not ino.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        by_name: dict[bytes, int] = {}
        listing: list[tuple[bytes, int, int]] = []
        for name, child, _ftype in self.image.iterdir(ino):
            if name == b"." or name == b"..":
                listing.append((name, -child - 1, 4))  # negative: not looked up in readdirplus
                continue
            child_ino = self.inode(child)
            if child_ino.is_stub_whiteout():
                continue  # overlayfs hides whiteouts of its lowest layer
            by_name[name] = child
            listing.append((name, child, _DT.get(child_ino.mode & S_IFMT, 0)))
        with self._lock:
            self._entries[nid] = (by_name, listing)
            while len(self._entries) > 4096:
                self._entries.popitem(last=False)
        return by_name, listing

    # -- requests ------------------------------------------------------------------------

    def lookup(self, nodeid: int, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0]
        child = self._directory(self._nid(nodeid))[0].get(name)
        if child is None:
            return _NEGATIVE  # a cached negative entry: the kernel will not ask again
        return self._entry(child)

    def getattr(self, nodeid: int, _body: memoryview) -> bytes:
        return p.ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0) + self._attr(self.inode(self._nid(nodeid)))

    def readlink(self, nodeid: int, _body: memoryview) -> bytes:
        ino = self.inode(self._nid(nodeid))
        if ino.mode & S_IFMT != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return self.image.readlink(ino)

    def open(self, nodeid: int, body: memoryview) -> bytes:
        flags, _open_flags = p.OPEN_IN.unpack_from(body)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only")
        ino = self.inode(self._nid(nodeid))
        if ino.mode & S_IFMT != stat.S_IFREG:
            raise OSError(errno.EISDIR if ino.is_dir() else errno.EINVAL, "not a file")
        payload, digest = self.image.backing_file(ino)
        backing_id = 0
        open_flags = p.FOPEN_KEEP_CACHE
        if payload is None:
            data = None
            if ino.layout != fmt.EROFS_INODE_CHUNK_BASED and ino.size:
                data = self.image.read_data(ino, ino.size)
            handle = _OpenFile(ino.nid, None, data, 0)
        else:
            obj = open_object(
                self.basedir_fds, payload, ino.size, digest, verify=self.options.verify,
                cache=self.block_hashes,
            )  # fmt: skip
            backing_id = self._passthrough(ino.nid, obj)
            if backing_id:
                open_flags = p.FOPEN_PASSTHROUGH  # the kernel takes no other flag with it
            handle = _OpenFile(ino.nid, obj, None, backing_id)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = handle
        return p.OPEN_OUT.pack(fh, open_flags, backing_id)

    def _passthrough(self, nid: int, obj: ServedObject) -> int:
        """A backing id for the kernel to read ``obj`` itself, or 0 to serve reads here.

        Passing through gives native reads and one page cache with every other mount of
        the object, but the kernel then reads the file without us: only objects whose
        every read stays checked qualify.  That is an object with kernel fs-verity, or one
        fully checked against its digest that only root can change (the server runs as
        root to pass through at all).  One backing file per inode, as the kernel wants.
        """
        if self.backing_open is None or not obj.trusted_for_passthrough():
            return 0
        with self._lock:
            shared = self._backing.get(nid)
            if shared is not None:
                self._backing[nid] = (shared[0], shared[1] + 1)
                return shared[0]
            try:
                backing_id = self.backing_open(obj.fd)
            except OSError:
                return 0  # e.g. an object store on a stacked filesystem: too deep
            self._backing[nid] = (backing_id, 1)
            return backing_id

    def read(self, _nodeid: int, body: memoryview) -> bytes:
        fh, offset, size, *_rest = p.READ_IN.unpack_from(body)
        handle = self._files.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")
        if handle.obj is not None:
            return handle.obj.read(offset, size)
        if handle.data is None:
            ino = self.inode(self._nid(_nodeid))
            end = min(offset + size, ino.size)
            return bytes(max(0, end - offset))  # a file of holes
        return handle.data[offset : offset + size]

    def release(self, _nodeid: int, body: memoryview) -> bytes:
        fh = p.RELEASE_IN.unpack_from(body)[0]
        closing = 0
        with self._lock:
            handle = self._files.pop(fh, None)
            if handle is not None and handle.backing_id:
                backing_id, count = self._backing[handle.nid]
                if count > 1:
                    self._backing[handle.nid] = (backing_id, count - 1)
                else:
                    del self._backing[handle.nid]
                    closing = backing_id
        if closing and self.backing_close is not None:
            self.backing_close(closing)
        if handle is not None and handle.obj is not None:
            handle.obj.close()
        return b""

    def readdir(self, nodeid: int, body: memoryview, plus: bool = False) -> bytes:
        _fh, offset, size, *_rest = p.READ_IN.unpack_from(body)
        listing = self._directory(self._nid(nodeid))[1]
        out = bytearray()
        for index in range(offset, len(listing)):
            name, child, dtype = listing[index]
            namelen = len(name)
            dot = child < 0
            ino = -child - 1 if dot else child
            record = p.DIRENT_HEAD.pack(ino, index + 1, namelen, dtype)
            record += name + bytes(-(p.DIRENT_HEAD.size + namelen) % 8)
            if plus:
                # node id 0: "no entry to instantiate", what "." and ".." want
                entry = _NO_ENTRY if dot else self._entry(child)
                record = entry + record
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def readdirplus(self, nodeid: int, body: memoryview) -> bytes:
        return self.readdir(nodeid, body, plus=True)

    def _visible_xattrs(self, nodeid: int, root: bool) -> dict[bytes, bytes]:
        ino = self.inode(self._nid(nodeid))
        out: dict[bytes, bytes] = {}
        for key, value in self.image.raw_xattrs(ino):
            if key.startswith(_OVERLAY):
                if not key.startswith(_ESCAPED):
                    continue  # overlayfs' own: redirect, metacopy, opaque...
                key = _OVERLAY + key[len(_ESCAPED) :]
            if key.startswith(_TRUSTED) and not root:
                continue
            if key in _ACL_NAMES and not self.acl:
                continue
            out[key] = bytes(value)
        return out

    def getxattr(self, nodeid: int, body: memoryview, uid: int) -> bytes:
        size = p.GETXATTR_IN.unpack_from(body)[0]
        name = bytes(body[p.GETXATTR_IN.size :]).split(b"\0", 1)[0]
        if name in _ACL_NAMES and not self.acl:
            raise OSError(errno.EOPNOTSUPP if not self.options.acl else errno.ENODATA, "no ACL")
        value = self._visible_xattrs(nodeid, uid == 0).get(name)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return _sized(value, size)

    def listxattr(self, nodeid: int, body: memoryview, uid: int) -> bytes:
        size = p.GETXATTR_IN.unpack_from(body)[0]
        names = b"".join(k + b"\0" for k in self._visible_xattrs(nodeid, uid == 0))
        return _sized(names, size)

    def statfs(self, _nodeid: int, _body: memoryview) -> bytes:
        blocks = self.image.size // 4096
        inodes = self.image.header.inos
        return p.KSTATFS.pack(blocks, 0, 0, inodes, 0, 4096, 255, 4096, 0)


def _sized(value: bytes, size: int) -> bytes:
    """getxattr/listxattr: the size alone when asked with size 0, else the value."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value
