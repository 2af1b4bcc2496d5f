"""OCI layers (tar streams) applied in order into one :class:`~composefs.tree.Tree`.

Nothing is extracted to disk: each entry becomes an inode of the tree, and the content of
every file over the inline limit streams straight into the object store.  The rules are
the OCI image spec's (``layer.md``), with the safety of tarfile's ``data`` filter:

- names lose a leading ``/`` and ``./``; a ``..`` component rejects the layer, as does a
  parent that is not a directory (a symlink is never followed, so an absolute symlink
  cannot be written through);
- ``.wh.NAME`` hides ``NAME`` of the layers below, ``.wh..wh..opq`` every entry below
  that directory; whiteouts never hide what their own layer adds; any other ``.wh.``
  name is refused;
- hard links must name a file already in the tree (from this layer or one below), never a
  directory; the link becomes one more name of that inode;
- symlink targets are kept as written (a container resolves them in its own root);
  devices and fifos are kept (the tree is only described, never created);
- xattrs come from PAX ``SCHILY.xattr.*`` records; mtimes keep PAX fractions.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from typing import IO, Any

from composefs import fsverity
from composefs.errors import ComposefsError, TreeError
from composefs.objects import ObjectWriter, object_name
from composefs.tree import S_IFDIR, S_IFMT, Inode, Tree

INLINE_MAX = 64  # as mkcomposefs: smaller files live in the image
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_XATTR_PAX = "SCHILY.xattr."
# In a layer record (never in a layer: a layer's own headers are not trusted with this)
_RECORD_DIGEST = "COMPOSEFS.digest"
_RECORD_SIZE = "COMPOSEFS.size"


class LayerError(ComposefsError):
    """A layer entry breaks the rules; names the layer and the entry."""


def new_tree() -> Tree:
    """The empty root a stack of layers starts from (0755, root-owned, mtime 0)."""
    return Tree(Inode(S_IFDIR | 0o755))


class _Applier:
    def __init__(self, tree: Tree, writer: ObjectWriter | None, layer: str) -> None:
        self.tree = tree
        self.writer = writer
        self.from_record = writer is None
        self.layer = layer
        self.added: set[bytes] = set()  # paths this layer put there: its whiteouts spare them

    def fail(self, name: str, why: str) -> LayerError:
        return LayerError(f"{self.layer}: entry '{name}': {why}")

    def clean_path(self, name: str) -> tuple[bytes, ...]:
        raw = os.fsencode(name)
        parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
        if b".." in parts:
            raise self.fail(name, "'..' in the path (it would leave the image's root)")
        return parts

    def parent_of(self, name: str, parts: tuple[bytes, ...], create: bool) -> Inode:
        """The directory holding ``parts``; missing ones are made (0755) when ``create``."""
        node = self.tree.root
        for i, part in enumerate(parts[:-1]):
            assert node.entries is not None
            child = node.entries.get(part)
            if child is None:
                if not create:
                    raise self.fail(name, f"no directory {os.fsdecode(b'/'.join(parts[: i + 1]))}")
                child = Inode(S_IFDIR | 0o755)
                node.add(part, child)
            elif child.entries is None:
                kind = "a symlink" if child.mode & S_IFMT == stat.S_IFLNK else "not a directory"
                raise self.fail(
                    name, f"{os.fsdecode(b'/'.join(parts[: i + 1]))} is {kind} (never followed)"
                )
            node = child
        return node

    def remove(self, directory: Inode, name: bytes) -> None:
        assert directory.entries is not None
        node = directory.entries.pop(name)
        if node.entries is None and node.nlink > 1:
            node.nlink -= 1
            if node.parent is directory and node.name == name:
                node.parent, node.name = self.other_name(node)  # the home moves (rare)

    def other_name(self, node: Inode) -> tuple[Inode, bytes]:
        stack = [self.tree.root]
        while stack:
            d = stack.pop()
            assert d.entries is not None
            for n, child in d.entries.items():
                if child is node:
                    return d, n
                if child.entries is not None and d.is_home_of(n, child):
                    stack.append(child)
        raise AssertionError("a hard-linked inode with no name left")

    def apply(self, member: tarfile.TarInfo, read: Callable[[int], bytes]) -> Inode | None:
        """Apply one entry; returns the inode it made, if any."""
        parts = self.clean_path(member.name)
        if not parts:  # the root itself
            if member.isdir():
                self.set_metadata(self.tree.root, member)
            return None
        base = parts[-1]
        if base.startswith(WHITEOUT.encode()):
            self.whiteout(member.name, parts)
            return None
        parent = self.parent_of(member.name, parts, create=True)
        assert parent.entries is not None
        path = b"/".join(parts)
        existing = parent.entries.get(base)
        if member.islnk():
            target_parts = self.clean_path(member.linkname)
            target_dir = self.parent_of(member.linkname, target_parts, create=False)
            assert target_dir.entries is not None
            target = target_dir.entries.get(target_parts[-1]) if target_parts else None
            if target is None:
                raise self.fail(member.name, f"hard link to missing '{member.linkname}'")
            if target.entries is not None:
                raise self.fail(member.name, "hard link to a directory")
            if existing is target:
                return None
            if existing is not None:
                self.remove(parent, base)
            self.add(parent, base, target, path)
            target.nlink += 1
            return None
        if existing is not None and existing.entries is not None and member.isdir():
            self.set_metadata(existing, member)  # a directory again: keeps its entries
            self.added.add(path)
            return None
        node = self.make_inode(member, read)
        if existing is not None:
            self.remove(parent, base)
        self.add(parent, base, node, path)
        return node

    def add(self, parent: Inode, name: bytes, node: Inode, path: bytes) -> None:
        try:
            parent.add(name, node)
        except TreeError as e:
            raise self.fail(os.fsdecode(path), e.describe()) from None
        self.added.add(path)

    def whiteout(self, name: str, parts: tuple[bytes, ...]) -> None:
        try:
            parent = self.parent_of(name, parts, create=False)
        except LayerError:
            return  # nothing below to hide
        assert parent.entries is not None
        prefix = b"/".join(parts[:-1])
        if parts[-1] == OPAQUE.encode():
            for child in list(parent.entries):
                if (prefix + b"/" + child).lstrip(b"/") not in self.added:
                    self.remove(parent, child)
            return
        hidden = parts[-1][len(WHITEOUT) :]
        if not hidden or hidden.startswith(WHITEOUT.encode()) or hidden in (b".", b".."):
            raise self.fail(name, "reserved whiteout name")
        path = (prefix + b"/" + hidden).lstrip(b"/")
        if hidden in parent.entries and path not in self.added:
            self.remove(parent, hidden)

    def make_inode(self, m: tarfile.TarInfo, read: Callable[[int], bytes]) -> Inode:
        if m.isreg():
            ftype = stat.S_IFREG
        elif m.isdir():
            ftype = stat.S_IFDIR
        elif m.issym():
            ftype = stat.S_IFLNK
        elif m.ischr():
            ftype = stat.S_IFCHR
        elif m.isblk():
            ftype = stat.S_IFBLK
        elif m.isfifo():
            ftype = stat.S_IFIFO
        else:
            raise self.fail(m.name, f"unsupported tar entry type {m.type!r}")
        node = Inode(ftype | (m.mode & 0o7777))
        self.set_metadata(node, m)
        if ftype == stat.S_IFLNK:
            if not m.linkname:
                raise self.fail(m.name, "symlink without a target")
            node.payload = os.fsencode(m.linkname)
            node.size = len(node.payload)
        elif ftype in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = os.makedev(m.devmajor, m.devminor)
        elif ftype == stat.S_IFREG and self.from_record and _RECORD_DIGEST in m.pax_headers:
            try:
                node.size = int(m.pax_headers[_RECORD_SIZE])
                node.digest = bytes.fromhex(m.pax_headers[_RECORD_DIGEST])
            except (KeyError, ValueError):
                raise self.fail(m.name, "bad layer record entry") from None
            node.payload = object_name(node.digest).encode()
        elif ftype == stat.S_IFREG and m.size:
            node.size = m.size
            try:
                if m.size <= INLINE_MAX:  # embedded, but named by its digest all the same
                    node.content = read(m.size)
                    if len(node.content) != m.size:
                        raise OSError(errno.EIO, "content ends early")
                    node.digest = fsverity.digest(node.content)
                else:
                    assert self.writer is not None
                    node.digest = self.writer.add_stream(read, m.size)
            except OSError as e:
                raise self.fail(m.name, e.strerror or str(e)) from None
            node.payload = object_name(node.digest).encode()
        return node

    def set_metadata(self, node: Inode, m: tarfile.TarInfo) -> None:
        node.mode = (node.mode & S_IFMT) | (m.mode & 0o7777)
        node.uid, node.gid = m.uid, m.gid
        mtime = m.pax_headers.get("mtime")
        if mtime is not None:
            whole, _, frac = mtime.partition(".")
            try:
                node.mtime_sec = int(whole)
                node.mtime_nsec = int((frac + "000000000")[:9]) if frac else 0
            except ValueError:
                raise self.fail(m.name, f"bad PAX mtime {mtime!r}") from None
        else:
            node.mtime_sec, node.mtime_nsec = int(m.mtime), 0
        for key, value in m.pax_headers.items():
            if key.startswith(_XATTR_PAX):
                xname = os.fsencode(key[len(_XATTR_PAX) :])
                try:
                    node.set_xattr(xname, value.encode("utf-8", "surrogateescape"))
                except TreeError as e:
                    raise self.fail(m.name, e.describe()) from None


RECORD_FORMAT = "composefs-py layer record"


def apply_layer(
    tree: Tree,
    stream: IO[bytes],
    writer: ObjectWriter,
    *,
    name: str,
    record: IO[bytes] | None = None,
) -> None:
    """Apply one uncompressed layer tar ``stream`` on top of ``tree``; file content goes
    into ``writer`` (committed by the caller once every layer is in).

    With ``record``, a *layer record* is written there: one JSON line per tar entry with
    its header fields, each file named by its object instead of holding its content
    (inline files excepted).  It is a few percent of the layer, :func:`apply_record`
    replays it without the layer, and reading it is far quicker than parsing tar headers.
    """
    applier = _Applier(tree, writer, name)
    if record is not None:
        record.write(json.dumps({"format": RECORD_FORMAT, "version": 1}).encode() + b"\n")
    try:
        with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tar:
            for member in tar:
                fileobj = tar.extractfile(member) if member.isreg() else None
                read = fileobj.read if fileobj is not None else _no_content
                node = applier.apply(member, read)
                if record is not None:
                    record.write(_record_line(member, node))
    except tarfile.TarError as e:
        raise LayerError(f"{name}: not a valid tar stream: {e}") from None
    except EOFError:
        raise LayerError(f"{name}: the tar stream ends early") from None


def _record_line(m: tarfile.TarInfo, node: Inode | None) -> bytes:
    pax = {k: v for k, v in m.pax_headers.items() if k == "mtime" or k.startswith(_XATTR_PAX)}
    digest = inline = ""
    if m.isreg() and node is not None:
        if node.content is not None:
            inline = base64.b64encode(node.content).decode()
        elif node.digest is not None:
            digest = node.digest.hex()
    size = node.size if m.isreg() and node is not None else 0
    fields = [m.name, m.type.decode("latin-1"), m.mode, m.uid, m.gid, int(m.mtime), m.linkname,
              size, digest, inline, m.devmajor, m.devminor, pax]  # fmt: skip
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


RecordEntries = list[list[Any]]


def parse_record(record: bytes, name: str = "layer record") -> RecordEntries:
    """The entries of a layer record (parse once, then check and replay)."""
    head, _, body = record.partition(b"\n")
    try:
        meta = json.loads(head)
        if not isinstance(meta, dict) or meta.get("format") != RECORD_FORMAT:
            raise ValueError("not a layer record")
        if meta.get("version") != 1:
            raise ValueError(f"unknown version {meta.get('version')}")
        # one decoder call for the whole body: far quicker than one per line
        entries = json.loads(b"[" + body.rstrip(b"\n").replace(b"\n", b",") + b"]")
    except (ValueError, UnicodeDecodeError) as e:
        raise LayerError(f"{name}: damaged layer record: {e}") from None
    if not isinstance(entries, list) or not all(
        isinstance(e, list) and len(e) == 13 for e in entries
    ):
        raise LayerError(f"{name}: damaged layer record: malformed entries")
    return entries


def record_objects(record: bytes | RecordEntries, name: str = "layer record") -> set[bytes]:
    """The digests of the objects a layer record names."""
    entries = parse_record(record, name) if isinstance(record, bytes) else record
    try:
        return {bytes.fromhex(f[8]) for f in entries if f[8]}
    except (TypeError, ValueError) as e:
        raise LayerError(f"{name}: damaged layer record: {e}") from None


def apply_record(tree: Tree, record: bytes | RecordEntries, *, name: str) -> None:
    """Replay a layer record made by :func:`apply_layer` (its objects must be present)."""
    applier = _Applier(tree, None, name)
    for f in parse_record(record, name) if isinstance(record, bytes) else record:
        try:
            (path, kind, mode, uid, gid, mtime, linkname, size, digest, inline,
             major, minor, pax) = f  # fmt: skip
            m = tarfile.TarInfo(path)
            m.type, m.mode, m.uid, m.gid, m.mtime = kind.encode("latin-1"), mode, uid, gid, mtime
            m.linkname, m.devmajor, m.devminor = linkname, major, minor
            m.pax_headers = dict(pax)
            content = base64.b64decode(inline) if inline else b""
            m.size = len(content)
            if digest:
                m.pax_headers[_RECORD_DIGEST] = digest
                m.pax_headers[_RECORD_SIZE] = str(size)
        except (TypeError, ValueError, AttributeError) as e:
            raise LayerError(f"{name}: damaged layer record: {e}") from None
        applier.apply(m, io.BytesIO(content).read)


def _no_content(_n: int) -> bytes:
    raise OSError(errno.EIO, "entry has no content")
