"""The composefs dump format (composefs-dump(5)): one text line per file of a tree.

Follows ``docs/dumpfile.md`` of the project specs, which restates the reference
(``mkcomposefs --from-file`` parses, ``composefs-info dump`` emits).  Parsing is *lenient*
by default and *strict* when asked (or when ``CFS_PARSE_STRICT`` is set, like the reference):
strict mode requires the trailing newline, zero RDEV on non-devices, symlink SIZE equal to
the target length and no CONTENT on symlinks.

Deliberate differences from the reference parser, all for input it mishandles: a number
with trailing garbage is always an error (the reference sometimes ignores it, depending on
the values of other fields), and DIGEST must be exactly 64 hex digits or ``-`` (the
reference reads undefined memory otherwise; an empty field counts as absent).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

from composefs.errors import DumpfileError, TreeError
from composefs.tree import (
    FILE_TYPES,
    INLINE_CONTENT_MAX,
    NAME_MAX,
    PAYLOAD_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    XATTR_BUDGET,
    XATTR_HEADER_OVERHEAD,
    XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
    Inode,
    Tree,
)

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
FIXED_FIELDS = 11
XATTR_TEXT_MAX = 0xFFFF  # longer xattr sections are refused before parsing them

_HEX = frozenset(b"0123456789abcdefABCDEF")
# Byte tests in hot paths use ints: ``0x5C in field`` is a memchr, while ``b"\\" in field``
# first tries the operand as an integer, raising and clearing a TypeError every time.
_BACKSLASH = 0x5C
_NUL = 0
_SIMPLE_ESCAPES = {ord("\\"): 0x5C, ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09}
_C_SPACE = b" \t\n\v\f\r"


def _bare_inode_factory() -> Callable[[type[Inode]], Inode] | None:
    """``Inode.__new__`` where it makes an empty inode to fill in; None when the model is
    compiled by mypyc, whose classes can only be made through ``__init__``."""
    try:
        Inode.__new__(Inode)
    except TypeError:
        return None
    return Inode.__new__


_BARE_INODE = _bare_inode_factory()


class _ParseError(Exception):
    """Internal: a message without position, turned into DumpfileError by the caller."""

    line: int | None = None


# -- escaping -------------------------------------------------------------------------------


def unescape(field: bytes) -> bytes:
    """Decode the escapes of one dump field (``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\xHH``)."""
    if _BACKSLASH not in field:
        return field
    out = bytearray()
    i = 0
    n = len(field)
    while True:
        j = field.find(b"\\", i)
        if j < 0:
            out += field[i:]
            return bytes(out)
        out += field[i:j]
        if j + 1 >= n:
            raise _ParseError("No character after escape")
        c = field[j + 1]
        simple = _SIMPLE_ESCAPES.get(c)
        if simple is not None:
            out.append(simple)
            i = j + 2
        elif c == 0x78:  # x
            if n - (j + 2) < 2:
                raise _ParseError("No hex characters after hex escape")
            hi, lo = field[j + 2], field[j + 3]
            if hi not in _HEX or lo not in _HEX:
                raise _ParseError("Invalid hex characters after hex escape")
            out.append(int(field[j + 2 : j + 4], 16))
            i = j + 4
        else:
            raise _ParseError(f"Unsupported escape type {chr(c)}")


def _unescape_optional(field: bytes) -> bytes | None:
    if field == b"-":
        return None
    return unescape(field)


def _c_string(value: bytes) -> bytes:
    """The reference keeps paths, names and targets as C strings: NUL ends them."""
    nul = value.find(b"\0")
    return value if nul < 0 else value[:nul]


_ESCAPE_FIELD = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
_ESCAPE_XATTR = re.compile(rb"[^\x21-\x3c\x3e-\x5b\x5d-\x7e]")
_ESCAPED = {0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}


def escape_match(m: re.Match[bytes]) -> bytes:
    """``re.sub`` replacement for one byte that must be escaped (dumpfile.md §2.2)."""
    c = m.group()[0]
    return _ESCAPED.get(c) or b"\\x%02x" % c


# The bytes a PATH, PAYLOAD or CONTENT field prints as they are.  ``value.translate(None,
# FIELD_SAFE)`` deletes them, so it is empty when nothing needs escaping: several times
# faster than a regex search, and most fields need nothing.
FIELD_SAFE = bytes(c for c in range(0x21, 0x7F) if c != 0x5C)


def needs_escape(value: bytes) -> bool:
    """Whether a PATH, PAYLOAD or CONTENT field has a byte that must be escaped."""
    return bool(value.translate(None, FIELD_SAFE))


def escape(value: bytes) -> bytes:
    """Escape a PATH, PAYLOAD or CONTENT field (``=`` left as is)."""
    if not value.translate(None, FIELD_SAFE):
        return value
    return _ESCAPE_FIELD.sub(escape_match, value)


def escape_optional(value: bytes | None) -> bytes:
    """A PAYLOAD or CONTENT field: ``-`` when absent, a lone ``-`` value escaped."""
    if value is None:
        return b"-"
    if value == b"-":
        return b"\\x2d"
    return escape(value)


def escape_xattr(value: bytes) -> bytes:
    """Escape an xattr name or value (``=`` also escaped)."""
    return _ESCAPE_XATTR.sub(escape_match, value)


# -- numbers --------------------------------------------------------------------------------


def _parse_uint(field: bytes, base: int = 10) -> int:
    """strtoull() semantics: whitespace, sign, wrap-around of negatives, saturation."""
    if field.isdigit() and base == 10:
        value = int(field)
        return value if value <= U64 else U64
    s = field.lstrip(_C_SPACE)
    negative = False
    if s[:1] in (b"+", b"-"):
        negative = s[:1] == b"-"
        s = s[1:]
    digits = b"01234567" if base == 8 else b"0123456789"
    if not s or any(c not in digits for c in s):
        raise _ParseError(f"Invalid integer {field.decode('utf-8', 'backslashreplace')}")
    value = int(s, base)
    if value > U64:
        return U64
    return (-value) & U64 if negative else value


def _to_signed64(value: int) -> int:
    return value - (1 << 64) if value & (1 << 63) else value


# -- parsing --------------------------------------------------------------------------------


def _is_hex(value: bytes) -> bool:
    return all(c in _HEX for c in value)


def _parse_xattrs(text: bytes) -> dict[bytes, bytes]:
    """The KEY=VALUE pieces after the fixed fields, with the reference's limits."""
    if len(text) > XATTR_TEXT_MAX:
        raise _ParseError("Too many xattrs")
    xattrs: dict[bytes, bytes] = {}
    pieces = text.split(b" ")
    if text.endswith(b" "):
        pieces.pop()  # one trailing space ends the line harmlessly
    budget = 0
    for piece in pieces:
        eq = piece.find(b"=")
        if eq < 0:
            raise _ParseError("Missing = in xattr")
        key = _c_string(unescape(piece[:eq]))
        value = unescape(piece[eq + 1 :])
        if not key or len(key) > XATTR_NAME_MAX or len(value) > XATTR_VALUE_MAX:
            raise _ParseError("Can't set xattr")
        old = xattrs.pop(key, None)
        if old is not None:
            budget -= 7 + len(key) + len(old)
        cost = 7 + len(key) + len(value)
        if not xattrs:
            budget = 0
            cost += XATTR_HEADER_OVERHEAD
        if budget + cost > XATTR_BUDGET:
            raise _ParseError("Can't set xattr")
        budget += cost
        xattrs[key] = value
    return xattrs


# A line in canonical form: absolute path, plain decimal/octal numbers short enough that
# no saturation, wrap-around or 32-bit truncation applies, not a hardlink, exactly 11
# fixed fields.  Anything else takes the careful path, which also produces the precise
# error messages.  (Paths with escapes are sent there too, by the caller: ``[^ \\]`` here
# would make the regex much slower than the memchr of ``[^ ]``.)
_FAST_LINE = re.compile(
    rb"(/[^ ]*) ([0-9]{1,19}) ([0-7]{1,10}) ([0-9]{1,9}) ([0-9]{1,9}) ([0-9]{1,9}) "
    rb"([0-9]{1,19}) (-?[0-9]{1,18})\.([0-9]{1,9}) ([^ ]*) ([^ ]*) ([^ ]*)(?: (.*))?",
    re.DOTALL,
)


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


class _Parser:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.root: Inode | None = None
        # canonical path (no trailing slash) -> directory, for the fast insert path
        self.dirs: dict[bytes, Inode] = {}
        # (parent, name, placeholder, target path or None) in line order
        self.hardlinks: list[tuple[Inode, bytes, Inode, bytes | None]] = []

    def insert(self, path: bytes, node: Inode) -> Inode:
        """Place ``node`` at ``path``; returns the parent directory."""
        if path == b"/":
            if node.entries is None:
                raise _ParseError("Root must be a directory")
            if self.root is not None:
                raise _ParseError("Can't have multiple roots")
            self.root = node
            node.parent = node
            node.name = b""
            self.dirs[b""] = node
            return node
        if self.root is None:
            raise _ParseError("Root node not present")
        parent: Inode | None = self.root
        parts = path.split(b"/")
        # Leading and repeated slashes are skipped; a trailing slash leaves an empty name.
        while parts and not parts[0]:
            parts.pop(0)
        name = parts[-1] if parts else b""
        for part in parts[:-1]:
            if not part:
                continue
            assert parent is not None
            entries = parent.entries
            parent = entries.get(part) if entries is not None else None
            if parent is None:
                raise _ParseError(f"Parent directory missing for {_show(path)}")
        assert parent is not None
        if parent.mode & S_IFMT != S_IFDIR:
            raise _ParseError(f"Parent must be a directory for {_show(path)}")
        if name in (b".", b".."):
            raise _ParseError(f"Invalid . or .. in path: {_show(path)}")
        entries = parent.entries
        assert entries is not None
        if not name or len(name) > NAME_MAX:
            raise _ParseError("Can't add child")
        if name in entries:
            # The reference's "already exist" branch is unreachable: it says this.
            raise _ParseError("Can't add child")
        entries[name] = node
        node.parent = parent
        node.name = name
        if node.entries is not None:
            self.dirs[b"/" + b"/".join(p for p in parts if p)] = node
        return parent

    def lines(self, lines: list[bytes], count: int) -> int:
        """Parse ``lines[:count]``; returns how many were parsed (all, unless one raised).

        Lines in the common canonical form are handled right here, the plainest kind (a
        file or directory without content, xattrs or device number, under a directory
        already seen) without a single Python-level call: this loop runs once per file.
        Everything else goes through :meth:`line_slow`, :meth:`_line_other` and
        :meth:`finish`, which implement every rule.  The caller makes sure that the lines
        hold no NUL, which the regex does not look for.
        """
        match = _FAST_LINE.fullmatch
        new_inode = _BARE_INODE
        dirs = self.dirs
        bad_names = (b"", b".", b"..")
        done = 0
        try:
            for line in lines[:count]:
                done += 1
                m = match(line)
                if m is None:
                    self.line_slow(line)
                    continue
                (path, size_s, mode_s, nlink, uid, gid, rdev_s, sec, nsec, payload, content,
                 digest, xattrs) = m.groups()  # fmt: skip
                if _BACKSLASH in path:
                    self.line_slow(line)
                    continue
                mode = int(mode_s, 8)
                ftype = mode & S_IFMT
                if not (
                    content == b"-"
                    and not xattrs
                    and rdev_s == b"0"
                    and ftype in (S_IFREG, S_IFDIR)
                    and (digest == b"-" or len(digest) == 64)
                    and (
                        payload == b"-"
                        or (len(payload) <= PAYLOAD_MAX and _BACKSLASH not in payload)
                    )
                ):
                    self._line_other(m, mode, ftype)
                    continue
                if new_inode is None:  # compiled: the constructor is cheap there
                    node = Inode(
                        mode, int(nlink), int(uid), int(gid), 0, int(size_s), int(sec),
                        int(nsec), None, None if payload == b"-" else payload,
                    )  # fmt: skip
                else:
                    # Inode.__init__ would be a Python call with ten arguments for every
                    # line; the fields are set here instead (all of them: tests check it).
                    node = new_inode(Inode)
                    node.mode = mode
                    node.nlink = int(nlink)
                    node.uid = int(uid)
                    node.gid = int(gid)
                    node.rdev = 0
                    node.size = int(size_s)
                    node.mtime_sec = int(sec)
                    node.mtime_nsec = int(nsec)
                    node.xattrs = {}
                    node.payload = None if payload == b"-" else payload
                    node.content = None
                    node.digest = None
                    node.entries = {} if ftype == S_IFDIR else None
                # Insert under a directory met before, by its canonical path; anything
                # unusual (or an error, such as a duplicate) is left to insert().
                parent_path, _, name = path.rpartition(b"/")
                parent = dirs.get(parent_path)
                entries = parent.entries if parent is not None else None
                if entries is None or name in bad_names or len(name) > NAME_MAX or name in entries:
                    self.insert(path, node)
                else:
                    entries[name] = node
                    node.parent = parent
                    node.name = name
                    if ftype == S_IFDIR:
                        dirs[path] = node
                if digest != b"-":
                    if not _is_hex(digest):
                        raise _ParseError(f"Invalid digest {_show(digest)}")
                    node.digest = bytes.fromhex(digest.decode())
        except _ParseError as e:
            e.line = done
            raise
        return done

    def _line_other(self, m: re.Match[bytes], mode: int, ftype: int) -> None:
        """A canonical line that is not the plainest kind: known-good numbers, the rest
        checked by :meth:`finish`."""
        (path, size_s, _mode, nlink, uid, gid, rdev_s, sec, nsec, payload, content, digest,
         xattrs) = m.groups()  # fmt: skip
        if ftype not in FILE_TYPES:
            raise _ParseError(f"Invalid mode {mode:o}")
        node = Inode(mode)
        self._insert_fast(path, node, ftype)
        self.finish(
            node,
            ftype,
            int(size_s),
            int(nlink) & U32,
            int(uid) & U32,
            int(gid) & U32,
            int(rdev_s),
            int(sec),
            int(nsec) & U32,
            payload,
            content,
            digest,
            xattrs or b"",
        )

    def _insert_fast(self, path: bytes, node: Inode, ftype: int) -> None:
        """Insert at a canonical path whose parent directory was seen, else the careful way."""
        parent_path, _, name = path.rpartition(b"/")
        parent = self.dirs.get(parent_path)
        if parent is None or not name or name == b"." or name == b".." or len(name) > NAME_MAX:
            self.insert(path, node)
            return
        entries = parent.entries
        assert entries is not None
        if name in entries:
            self.insert(path, node)  # reports the duplicate
            return
        entries[name] = node
        node.parent = parent
        node.name = name
        if ftype == S_IFDIR:
            self.dirs[path] = node

    def line_slow(self, line: bytes) -> None:
        nul = line.find(b"\0")
        if nul >= 0:
            raise _ParseError(f"Invalid embedded NUL character at position {nul}")
        fields = line.split(b" ", FIXED_FIELDS)
        if len(fields) < FIXED_FIELDS + 1:
            fields += [b""] * (FIXED_FIELDS + 1 - len(fields))
        path = _c_string(unescape(fields[0]))
        if not path:
            raise _ParseError("Invalid empty path")
        mode_field = fields[2]
        hardlink = mode_field[:1] == b"@"
        if hardlink:
            mode_field = mode_field[1:]
        mode = _parse_uint(mode_field, 8) & U32
        ftype = mode & S_IFMT
        if ftype not in FILE_TYPES:
            raise _ParseError(f"Invalid mode {mode:o}")
        node = Inode(mode)
        parent = self.insert(path, node)

        if hardlink:
            if ftype == S_IFDIR:
                raise _ParseError("Directories can't be hardlinked")
            target = _unescape_optional(fields[8])
            if target is not None:
                target = _c_string(target)
            assert node.name is not None
            self.hardlinks.append((parent, node.name, node, target))
            return

        size = _parse_uint(fields[1])
        nlink = _parse_uint(fields[3]) & U32
        uid = _parse_uint(fields[4]) & U32
        gid = _parse_uint(fields[5]) & U32
        rdev = _parse_uint(fields[6])
        mtime = fields[7]
        dot = mtime.find(b".")
        if dot < 0:
            sec_field, nsec_field = mtime, b""
        else:
            sec_field, nsec_field = mtime[:dot], mtime[dot + 1 :]
        sec = _to_signed64(_parse_uint(sec_field))
        nsec = _parse_uint(nsec_field) & U32
        self.finish(
            node,
            ftype,
            size,
            nlink,
            uid,
            gid,
            rdev,
            sec,
            nsec,
            fields[8],
            fields[9],
            fields[10],
            fields[11],
        )

    def finish(
        self,
        node: Inode,
        ftype: int,
        size: int,
        nlink: int,
        uid: int,
        gid: int,
        rdev: int,
        sec: int,
        nsec: int,
        payload_field: bytes,
        content_field: bytes,
        digest_field: bytes,
        xattr_text: bytes,
    ) -> None:
        """The part of a line's parsing after the numbers: payload, content, xattrs."""
        node.nlink = nlink
        node.uid = uid
        node.gid = gid
        node.mtime_sec = sec
        node.mtime_nsec = nsec
        payload = None if payload_field == b"-" else unescape(payload_field)
        content = None if content_field == b"-" else unescape(content_field)
        if content is not None and len(content) != size:
            raise _ParseError(f"Invalid content size {len(content)}, must match size {size}")
        digest = None if digest_field == b"-" else unescape(digest_field)

        node.size = size
        if ftype in (S_IFCHR, S_IFBLK):
            node.rdev = rdev
        else:
            node.rdev = 0
            if rdev != 0 and self.strict:
                raise _ParseError("Non-zero devnum on non-device")
        node.content = None
        node.payload = None
        if ftype == S_IFLNK:
            target = _c_string(payload) if payload is not None else b""
            if not target or len(target) > PAYLOAD_MAX:
                raise _ParseError("Invalid symlink")
            if self.strict:
                if size != len(target):
                    raise _ParseError(f"Invalid symlink size {len(target)}, must match size {size}")
                if content:
                    raise _ParseError("Symlink cannot have content")
            node.payload = target
            node.size = len(target)
        else:
            if payload is not None:
                if _NUL in payload:
                    payload = _c_string(payload)
                if len(payload) > PAYLOAD_MAX:
                    raise _ParseError("Invalid payload")
                node.payload = payload
            if content is not None:
                if len(content) > INLINE_CONTENT_MAX:
                    raise _ParseError(
                        f"Inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}"
                    )
                node.size = len(content)
                if content and ftype == S_IFREG:
                    node.content = content
        node.digest = None
        if digest:
            if len(digest) != 64 or not _is_hex(digest):
                raise _ParseError(f"Invalid digest {_show(digest)}")
            node.digest = bytes.fromhex(digest.decode())

        if not xattr_text:
            node.xattrs = {}
            return
        node.xattrs = _parse_xattrs(xattr_text)

    def resolve_hardlinks(self) -> None:
        root = self.root
        assert root is not None
        link_to: dict[int, Inode] = {}
        # The reference resolves them last line first; the order decides which error
        # is reported when several links are bad.
        for _parent, _name, placeholder, target_path in reversed(self.hardlinks):
            if target_path is None:
                raise _ParseError("No target path for the hardlink")
            target = root.lookup(target_path)
            if target is None:
                raise _ParseError(f"No target at {_show(target_path)} for hardlink")
            if target is placeholder:
                raise _ParseError(f"Self-referential hardlink {_show(target_path)}")
            link_to[id(placeholder)] = target
        for parent, name, placeholder, _target in self.hardlinks:
            target = placeholder
            seen = 0
            while id(target) in link_to:
                target = link_to[id(target)]
                seen += 1
                if seen > len(link_to):
                    where = parent.path().rstrip(b"/") + b"/" + name
                    raise TreeError(errno.ELOOP, "hardlink cycle", path=where)
            assert parent.entries is not None
            parent.entries[name] = target


def _split_lines(data: bytes) -> tuple[list[bytes], bool]:
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    if terminated:
        lines.pop()
    return lines, terminated


def parse(data: bytes, *, strict: bool | None = None, source: str | None = None) -> Tree:
    """Parse a whole dump file into a :class:`Tree`.

    ``strict=None`` follows the reference: strict iff ``CFS_PARSE_STRICT`` is set.
    Errors raise :class:`DumpfileError` naming the line; a hardlink cycle raises
    :class:`TreeError` (ELOOP), as the reference reports it when writing.
    """
    if strict is None:
        strict = "CFS_PARSE_STRICT" in os.environ
    parser = _Parser(strict)
    lines, terminated = _split_lines(data)
    count = len(lines)
    if not terminated and strict:
        count -= 1
    lineno = 0
    # The fast path cannot see embedded NULs; input that has any takes the careful one.
    fast = b"\0" not in data
    try:
        if fast:
            try:
                parser.lines(lines, count)
            except _ParseError as e:
                lineno = e.line or 0
                raise
        else:
            for lineno in range(1, count + 1):
                parser.line_slow(lines[lineno - 1])
        if not terminated and strict:
            lineno = len(lines)
            raise _ParseError("Missing trailing newline")
        lineno = 0
        if parser.root is None:
            raise _ParseError("No files in dump file")
        parser.resolve_hardlinks()
    except _ParseError as e:
        raise DumpfileError(str(e), line=lineno or None, source=source) from None
    return Tree(parser.root)


def line_of(data: bytes, path: bytes) -> int | None:
    """The 1-based line of a dump that defines ``path`` (for errors found after parsing)."""
    wanted = b"/" + b"/".join(p for p in path.split(b"/") if p)
    for number, line in enumerate(data.split(b"\n"), 1):
        field = line.split(b" ", 1)[0]
        try:
            candidate = _c_string(unescape(field))
        except _ParseError:
            continue
        if b"/" + b"/".join(p for p in candidate.split(b"/") if p) == wanted:
            return number
    return None


def load(path: str | os.PathLike[str], *, strict: bool | None = None) -> Tree:
    """Parse a dump file from a path (``-`` is standard input)."""
    if os.fspath(path) == "-":
        import sys

        return parse(sys.stdin.buffer.read(), strict=strict, source="<stdin>")
    with open(path, "rb") as f:
        return parse(f.read(), strict=strict, source=os.fspath(path))


# -- emitting -------------------------------------------------------------------------------


def node_fields(node: Inode) -> tuple[bytes, bytes, bytes, bytes]:
    """The pieces of a node's dump line after its PATH: ``b" SIZE "``, ``b"MODE NLINK UID
    GID RDEV MTIME "``, the escaped PAYLOAD, and ``b" CONTENT DIGEST[ XATTRS]\\n"``.

    A hardlink line puts ``@`` before MODE and the first path in place of the payload, so
    the line is built by the caller from these pieces.
    """
    ftype = node.mode & S_IFMT
    digest = node.digest
    tail = b" %b %b" % (
        escape_optional(node.content if ftype == S_IFREG else None),
        b"-" if digest is None else digest.hex().encode(),
    )
    if node.xattrs:
        esc_x = _ESCAPE_XATTR.sub
        repl = escape_match
        tail += b"".join(
            [b" " + esc_x(repl, k) + b"=" + esc_x(repl, v) for k, v in node.xattrs.items()]
        )
    mid = b"%o %d %d %d %d %d.%d " % (
        node.mode,
        node.nlink,
        node.uid,
        node.gid,
        node.rdev if ftype in (S_IFCHR, S_IFBLK) else 0,
        node.mtime_sec,
        node.mtime_nsec,
    )
    return b" %d " % node.size, mid, escape_optional(node.payload), tail + b"\n"


def iter_lines(tree: Tree) -> Iterator[bytes]:
    """Dump lines of a tree, depth-first in name order.

    The first name under which an inode is met is printed in full; every later name is a
    hardlink line (``@`` MODE, PAYLOAD = the first path) repeating the inode's fields.
    """
    first_path: dict[int, bytes] = {}
    root = tree.root
    for path, node in tree.walk():
        head, mid, payload, tail = node_fields(node)
        path = escape(path)
        seen = first_path.get(id(node))
        if seen is not None and node is not root:
            yield path + head + b"@" + mid + seen + tail
        else:
            first_path[id(node)] = path
            yield path + head + mid + payload + tail


def dumps(tree: Tree) -> bytes:
    """The whole dump of a tree as bytes."""
    return b"".join(iter_lines(tree))


def dump(tree: Tree, out: BinaryIO) -> None:
    """Write the dump of a tree to a binary stream."""
    out.writelines(iter_lines(tree))
