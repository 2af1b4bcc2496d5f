"""Tests of the composefs-dump(5) parser and emitter against docs/dumpfile.md.

Section numbers (§) refer to that document.  Expected values come from the spec (its §6
example, the escaping corner cases, the error messages of §2.1, §3 and §7); inputs for the
error cases are built here, one small dump per message.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence

import pytest
from conftest import SHARED, pure_python_only
from hypothesis import given, settings
from hypothesis import strategies as st

from composefs import dumpfile
from composefs.errors import DumpfileError, TreeError
from composefs.tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
    Inode,
    Tree,
)

# -- the §6 example, verbatim ---------------------------------------------------------------

DIGEST_HEX = b"56d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362"

SPEC_INPUT = rb"""/ 4096 40755 2 0 0 0 1700000000.0 - - -
/ext.bin 10000 100644 1 0 0 0 1700000000.0 56/d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362 - 56d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362
/hello.txt 6 100644 1 0 0 0 1700000000.0 - hello\n -
/link 7 120777 1 0 0 0 1700000000.0 ext.bin - -
/a\x20dir 0 40755 2 0 0 0 1700000000.0 - - - user.comment=x\x3dy
/a\x20dir/wh 0 20000 1 0 0 0 1700000000.0 - - -
/hardlink 10000 @100644 2 0 0 0 1700000000.0 /ext.bin - -
/dash 1 100644 1 0 0 0 1700000000.0 - \x2d -
"""

# What `composefs-info dump` prints for the image built from SPEC_INPUT.
SPEC_OUTPUT = rb"""/ 4096 40755 3 0 0 0 1700000000.0 - - -
/a\x20dir 41 40755 2 0 0 0 1700000000.0 - - - trusted.overlay.opaque=x user.comment=x\x3dy user.overlay.opaque=x
/a\x20dir/wh 0 20000 1 0 0 0 1700000000.0 - - -
/dash 1 100644 1 0 0 0 1700000000.0 - \x2d -
/ext.bin 10000 100644 1 0 0 0 1700000000.0 56/d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362 - 56d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362
/hardlink 10000 @100644 1 0 0 0 1700000000.0 /ext.bin - 56d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362
/hello.txt 6 100644 1 0 0 0 1700000000.0 - hello\n -
/link 7 120777 1 0 0 0 1700000000.0 ext.bin - -
"""

SPEC_DOC = SHARED / "docs" / "dumpfile.md"


def test_embedded_spec_example_matches_the_document() -> None:
    """Guard against transcription errors in the two constants above."""
    if not SPEC_DOC.is_file():
        pytest.skip(f"{SPEC_DOC} not available")
    text = SPEC_DOC.read_bytes()
    section = text[text.index(b"## 6. Example") :]
    blocks = re.findall(rb"```\n(.*?)```", section, re.DOTALL)
    assert blocks[0] == SPEC_INPUT
    assert blocks[1] == SPEC_OUTPUT


# -- helpers --------------------------------------------------------------------------------

ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"


def ln(
    path: bytes,
    mode: bytes = b"100644",
    *,
    size: bytes = b"0",
    nlink: bytes = b"1",
    uid: bytes = b"0",
    gid: bytes = b"0",
    rdev: bytes = b"0",
    mtime: bytes = b"0.0",
    payload: bytes = b"-",
    content: bytes = b"-",
    digest: bytes = b"-",
    xattrs: Sequence[bytes] = (),
    newline: bool = True,
) -> bytes:
    """One dump line from (already escaped) fields."""
    fields = [path, size, mode, nlink, uid, gid, rdev, mtime, payload, content, digest]
    line = b" ".join([*fields, *xattrs])
    return line + b"\n" if newline else line


def signature(tree: Tree) -> list[tuple[object, ...]]:
    """Everything a dump can express, in walk order; hardlinks as 'same as first path'."""
    first: dict[int, bytes] = {}
    out: list[tuple[object, ...]] = []
    for path, node in tree.walk():
        home = first.setdefault(id(node), path)
        out.append(
            (
                path,
                home,
                node.mode,
                node.size,
                node.nlink,
                node.uid,
                node.gid,
                node.rdev,
                node.mtime_sec,
                node.mtime_nsec,
                node.payload,
                node.content,
                node.digest,
                tuple(node.xattrs.items()),
            )
        )
    return out


def parse_error(data: bytes, *, strict: bool) -> DumpfileError:
    with pytest.raises(DumpfileError) as exc:
        dumpfile.parse(data, strict=strict)
    return exc.value


def node_at(tree: Tree, path: bytes) -> Inode:
    node = tree.lookup(path)
    assert node is not None, path
    return node


# -- 1. the §6 example ----------------------------------------------------------------------


def test_parse_spec_example_strict() -> None:
    tree = dumpfile.parse(SPEC_INPUT, strict=True)
    root = tree.root
    assert root.mode == S_IFDIR | 0o755
    assert root.entries is not None
    assert sorted(root.entries) == [
        b"a dir",
        b"dash",
        b"ext.bin",
        b"hardlink",
        b"hello.txt",
        b"link",
    ]

    ext = node_at(tree, b"/ext.bin")
    assert ext.mode == S_IFREG | 0o644
    assert ext.size == 10000
    assert ext.payload == b"56/" + DIGEST_HEX[2:]
    assert ext.digest == bytes.fromhex(DIGEST_HEX.decode())
    assert ext.content is None
    assert (ext.uid, ext.gid, ext.mtime_sec, ext.mtime_nsec) == (0, 0, 1700000000, 0)

    hello = node_at(tree, b"/hello.txt")
    assert hello.mode == S_IFREG | 0o644
    assert hello.content == b"hello\n"
    assert hello.size == 6
    assert hello.payload is None
    assert hello.digest is None

    link = node_at(tree, b"/link")
    assert link.mode == S_IFLNK | 0o777
    assert link.payload == b"ext.bin"
    assert link.size == 7

    adir = node_at(tree, b"/a dir")
    assert adir.mode == S_IFDIR | 0o755
    assert adir.xattrs == {b"user.comment": b"x=y"}  # \x3d decoded to '='
    assert adir.entries is not None
    assert list(adir.entries) == [b"wh"]

    wh = node_at(tree, b"/a dir/wh")
    assert wh.mode == S_IFCHR  # 20000: char device, permission bits 0
    assert wh.rdev == 0
    assert wh.is_whiteout()

    # The hardlink is the very same inode; the target keeps the NLINK of its own line.
    assert node_at(tree, b"/hardlink") is ext
    assert ext.nlink == 1

    dash = node_at(tree, b"/dash")
    assert dash.content == b"-"
    assert dash.size == 1


def test_parse_spec_output_strict() -> None:
    """The dump printed by composefs-info is itself valid strict input (§6)."""
    tree = dumpfile.parse(SPEC_OUTPUT, strict=True)
    assert tree.root.nlink == 3
    adir = node_at(tree, b"/a dir")
    assert list(adir.xattrs.items()) == [
        (b"trusted.overlay.opaque", b"x"),
        (b"user.comment", b"x=y"),
        (b"user.overlay.opaque", b"x"),
    ]
    ext = node_at(tree, b"/ext.bin")
    assert node_at(tree, b"/hardlink") is ext
    assert ext.nlink == 1  # the @ line's NLINK is ignored


# -- 2. escaping ----------------------------------------------------------------------------


def test_escape_corner_cases_from_spec() -> None:
    # PATH `a=b c<0xff>\` -> `/a=b\x20c\xff\\` (no \x3d in paths)
    assert dumpfile.escape(b"/a=b c\xff\\") == rb"/a=b\x20c\xff\\"
    # xattr `user.k=x` = `v=w ` -> `user.k\x3dx=v\x3dw\x20`
    assert dumpfile.escape_xattr(b"user.k=x") == rb"user.k\x3dx"
    assert dumpfile.escape_xattr(b"v=w ") == rb"v\x3dw\x20"
    # priority 1 escapes, then lowercase hex for everything non-graphic
    assert dumpfile.escape(b"\\\n\r\t") == rb"\\\n\r\t"
    assert dumpfile.escape(b"\x00\x1f\x7f\x80\xab") == rb"\x00\x1f\x7f\x80\xab"
    assert dumpfile.escape(b"!~-") == b"!~-"


def test_emitter_corner_cases_from_spec() -> None:
    root = Inode(S_IFDIR | 0o755)
    root.add(b"a=b c\xff\\", Inode(S_IFREG | 0o644))
    root.add(b"x", Inode(S_IFREG | 0o644, xattrs={b"user.k=x": b"v=w "}))
    root.add(b"y", Inode(S_IFREG | 0o644, size=1, content=b"-"))
    root.add(b"z", Inode(S_IFLNK | 0o777, size=1, payload=b"-"))
    lines = dumpfile.dumps(Tree(root)).splitlines()
    assert len(lines) == 5
    assert lines[1].split(b" ")[0] == rb"/a=b\x20c\xff\\"
    assert lines[2] == rb"/x 0 100644 1 0 0 0 0.0 - - - user.k\x3dx=v\x3dw\x20"
    assert lines[3] == rb"/y 1 100644 1 0 0 0 0.0 - \x2d -"
    assert lines[4] == rb"/z 1 120777 1 0 0 0 0.0 \x2d - -"

    back = dumpfile.parse(dumpfile.dumps(Tree(root)), strict=True)
    assert node_at(back, b"/a=b c\xff\\").mode == S_IFREG | 0o644
    assert node_at(back, b"/x").xattrs == {b"user.k=x": b"v=w "}
    assert node_at(back, b"/y").content == b"-"
    assert node_at(back, b"/z").payload == b"-"


@pytest.mark.parametrize(
    ("escaped", "raw"),
    [
        (rb"\\", b"\\"),
        (rb"\n", b"\n"),
        (rb"\r", b"\r"),
        (rb"\t", b"\t"),
        (rb"\x41", b"A"),
        (rb"\xfF", b"\xff"),  # upper or lower case hex
        (rb"\xAb\x00", b"\xab\x00"),
        (b"a=b\xff-", b"a=b\xff-"),  # '=' and raw non-ASCII stand for themselves
        (rb"a\\n", b"a\\n"),
        (b"", b""),
    ],
)
def test_unescape(escaped: bytes, raw: bytes) -> None:
    assert dumpfile.unescape(escaped) == raw


ESCAPE_ERRORS = [
    (rb"a\q", "Unsupported escape type q"),
    (rb"a\"", 'Unsupported escape type "'),
    (b"a\\", "No character after escape"),
    (rb"a\x", "No hex characters after hex escape"),
    (rb"a\x4", "No hex characters after hex escape"),
    (rb"a\xg0", "Invalid hex characters after hex escape"),
    (rb"a\x0g", "Invalid hex characters after hex escape"),
]


@pytest.mark.parametrize(("field", "message"), ESCAPE_ERRORS)
def test_unescape_errors(field: bytes, message: str) -> None:
    with pytest.raises(dumpfile._ParseError, match=f"^{re.escape(message)}$"):
        dumpfile.unescape(field)


def _escape_error_inputs(bad: bytes) -> list[tuple[str, bytes]]:
    """The bad field placed in each escaped field of the second line."""
    return [
        ("path", ROOT + ln(b"/" + bad)),
        ("payload", ROOT + ln(b"/f", payload=bad)),
        ("content", ROOT + ln(b"/f", size=b"1", content=bad)),
        ("digest", ROOT + ln(b"/f", digest=bad)),
        ("xattr-key", ROOT + ln(b"/f", xattrs=[b"user." + bad + b"=v"])),
        ("xattr-value", ROOT + ln(b"/f", xattrs=[b"user.k=" + bad])),
        ("hardlink-target", ROOT + ln(b"/f") + ln(b"/h", b"@100644", payload=b"/" + bad)),
    ]


@pytest.mark.parametrize(
    ("data", "message", "line"),
    [
        pytest.param(data, message, 3 if where == "hardlink-target" else 2, id=f"{where}-{i}")
        for i, (bad, message) in enumerate(ESCAPE_ERRORS)
        for where, data in _escape_error_inputs(bad)
    ],
)
def test_escape_errors_through_parse(data: bytes, message: str, line: int) -> None:
    err = parse_error(data, strict=True)
    assert err.message == message
    assert err.line == line
    assert str(err) == f"<dump>:{line}: {message}"


def test_error_str_names_source() -> None:
    with pytest.raises(DumpfileError) as exc:
        dumpfile.parse(ROOT + ln(rb"/a\q"), strict=True, source="x.dump")
    assert str(exc.value) == "x.dump:2: Unsupported escape type q"
    with pytest.raises(DumpfileError) as exc:
        dumpfile.parse(b"", strict=True, source="x.dump")
    assert str(exc.value) == "x.dump: No files in dump file"


# -- 3. property: escaping round-trips ------------------------------------------------------

GRAPHIC = frozenset(range(0x21, 0x7F))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_escape_roundtrip_property(data: bytes) -> None:
    for esc in (dumpfile.escape, dumpfile.escape_xattr):
        encoded = esc(data)
        assert set(encoded) <= GRAPHIC, encoded
        assert dumpfile.unescape(encoded) == data
    assert b"=" not in dumpfile.escape_xattr(data)


# Random trees survive dumps() -> parse(strict) unchanged.
_names = st.binary(min_size=1, max_size=40).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
_no_nul = st.binary(max_size=60).filter(lambda b: b"\0" not in b)
_xattrs = st.dictionaries(
    st.binary(min_size=1, max_size=30).filter(lambda k: b"\0" not in k),
    st.binary(max_size=40),
    max_size=3,
)


@st.composite
def _leaf(draw: st.DrawFn) -> Inode:
    kind = draw(st.sampled_from(["reg-inline", "reg-external", "symlink", "chr", "blk", "sock"]))
    common = {
        "uid": draw(st.integers(0, 2**32 - 1)),
        "gid": draw(st.integers(0, 2**32 - 1)),
        "nlink": draw(st.integers(0, 2**32 - 1)),
        "mtime_sec": draw(st.integers(-(2**63), 2**63 - 1)),
        "mtime_nsec": draw(st.integers(0, 2**32 - 1)),
        "xattrs": draw(_xattrs),
    }
    perm = draw(st.integers(0, 0o7777))
    if kind == "reg-inline":
        content = draw(st.binary(min_size=1, max_size=60))
        return Inode(S_IFREG | perm, size=len(content), content=content, **common)
    if kind == "reg-external":
        digest = draw(st.none() | st.binary(min_size=32, max_size=32))
        payload = draw(st.none() | _no_nul)
        size = draw(st.integers(0, 2**64 - 1))
        return Inode(S_IFREG | perm, size=size, payload=payload, digest=digest, **common)
    if kind == "symlink":
        target = draw(_no_nul.filter(bool))
        return Inode(S_IFLNK | perm, size=len(target), payload=target, **common)
    if kind == "sock":
        return Inode(S_IFSOCK | perm, **common)
    ftype = S_IFCHR if kind == "chr" else S_IFBLK
    return Inode(ftype | perm, rdev=draw(st.integers(0, 2**32 - 1)), **common)


@st.composite
def _trees(draw: st.DrawFn) -> Tree:
    root = Inode(S_IFDIR | 0o755, xattrs=draw(_xattrs))
    dirs = [root]
    leaves: list[Inode] = []
    for _ in range(draw(st.integers(0, 8))):
        parent = draw(st.sampled_from(dirs))
        assert parent.entries is not None
        name = draw(_names.filter(lambda n, p=parent: n not in p.entries))
        what = draw(st.sampled_from(["dir", "leaf", "hardlink"] if leaves else ["dir", "leaf"]))
        if what == "dir":
            child = Inode(S_IFDIR | 0o700, xattrs=draw(_xattrs))
            dirs.append(child)
        elif what == "leaf":
            child = draw(_leaf())
            leaves.append(child)
        else:
            child = draw(st.sampled_from(leaves))
        parent.add(name, child)
    return Tree(root)


@settings(max_examples=150, deadline=None)
@given(_trees())
def test_dumps_parse_roundtrip_property(tree: Tree) -> None:
    text = dumpfile.dumps(tree)
    assert text.endswith(b"\n")
    for line in text.splitlines():
        assert set(line) <= GRAPHIC | {0x20}
    back = dumpfile.parse(text, strict=True)
    assert signature(back) == signature(tree)
    assert dumpfile.dumps(back) == text


# The parser has a fast path for lines in canonical form and a careful path for everything
# else; both must agree on every input (same tree, or same error on the same line).
_FIELD_CHOICES = {
    "path": [b"/", b"/a", b"/b", b"/a/c", b"//a", b"/a/", rb"/a\x20b", b"/.", b"a", rb"/x\q"],
    "num": [b"0", b"1", b"+1", b"-1", b"007", b"", b"x", b"4294967296", b"9" * 23],
    "mode": [b"40755", b"100644", b"120777", b"20000", b"60644", b"@100644", b"@40755", b"644"],
    "mtime": [b"0.0", b"1.1", b"-5.0", b"5", b"+1.2", b"1234567890123456789.0", b"0.4294967297"],
    "opt": [b"-", b"", b"a", rb"\x2d", b"/a", b"/b", b"abc", rb"a\x00b", b"x" * 4096, rb"\q"],
    "digest": [b"-", b"", b"ab", b"a" * 64, b"A" * 64, b"g" * 64, rb"\x41" + b"a" * 60],
    "xattr": [b"user.a=1", b"user.a=", b"=v", b"user.b", rb"user.c=\x3d", b"", b"user.a=2"],
}
_LAYOUT = ["path", "num", "mode", "num", "num", "num", "num", "mtime", "opt", "opt", "digest"]


@st.composite
def _messy_lines(draw: st.DrawFn) -> bytes:
    fields = [draw(st.sampled_from(_FIELD_CHOICES[kind])) for kind in _LAYOUT]
    fields += draw(st.lists(st.sampled_from(_FIELD_CHOICES["xattr"]), max_size=3))
    return b" ".join(fields)


def _outcome(data: bytes, strict: bool) -> tuple[object, ...]:
    try:
        return ("ok", signature(dumpfile.parse(data, strict=strict)))
    except DumpfileError as e:
        return ("error", e.message, e.line)
    except TreeError as e:
        return ("tree", e.errno)


@settings(max_examples=300, deadline=None)
@given(st.lists(_messy_lines(), max_size=6), st.booleans(), st.booleans())
def test_fast_and_careful_paths_agree(lines: list[bytes], strict: bool, root: bool) -> None:
    if not hasattr(dumpfile, "_FAST_LINE"):
        pytest.skip("no fast path in this version of dumpfile.py")
    data = (ROOT if root else b"") + b"\n".join(lines) + b"\n"
    fast = _outcome(data, strict)
    saved = dumpfile._FAST_LINE
    dumpfile._FAST_LINE = re.compile(rb"(?!)")  # never matches: every line takes the careful path
    try:
        careful = _outcome(data, strict)
    finally:
        dumpfile._FAST_LINE = saved
    assert fast == careful


@pure_python_only
def test_fast_path_sets_every_inode_field() -> None:
    # The fast path fills an Inode's slots itself rather than calling Inode(): a slot it
    # forgot would only show as an AttributeError when first read.
    tree = dumpfile.parse(
        b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
        b"/d 4096 40755 2 1 2 0 3.4 - - -\n"
        b"/d/f 5 100644 1 0 0 0 1.2 ab/cd - -\n"
        b"/e 0 100600 1 0 0 0 0.0 - - " + b"a" * 64 + b"\n"
    )
    nodes = [node for _path, node in tree.walk()]
    assert len(nodes) == 4
    for node in nodes:
        for slot in Inode.__slots__:
            getattr(node, slot)


# -- 4. round trip of the §6 example --------------------------------------------------------


def test_spec_example_roundtrip_is_stable() -> None:
    first = dumpfile.parse(SPEC_INPUT, strict=True)
    dump1 = dumpfile.dumps(first)
    second = dumpfile.parse(dump1, strict=True)
    dump2 = dumpfile.dumps(second)
    assert dump1 == dump2
    assert signature(first) == signature(second)
    assert node_at(second, b"/hardlink") is node_at(second, b"/ext.bin")


def test_spec_example_dump_matches_reference_lines() -> None:
    """dumps() of the parsed tree agrees with composefs-info on every line whose values
    do not come from the image writer (the root's NLINK, the directory's size and its
    overlay opaque markers are computed when building the image)."""
    ours = dumpfile.dumps(dumpfile.parse(SPEC_INPUT, strict=True)).splitlines()
    ref = SPEC_OUTPUT.splitlines()
    assert [line.split(b" ")[0] for line in ours] == [line.split(b" ")[0] for line in ref]
    image_derived = {b"/", rb"/a\x20dir"}
    for mine, theirs in zip(ours, ref, strict=True):
        if mine.split(b" ")[0] not in image_derived:
            assert mine == theirs
    assert ours[0] == b"/ 4096 40755 2 0 0 0 1700000000.0 - - -"
    assert ours[1] == rb"/a\x20dir 0 40755 2 0 0 0 1700000000.0 - - - user.comment=x\x3dy"


def test_spec_output_reproduced_exactly() -> None:
    """Parsing composefs-info's output and dumping it again gives the same bytes."""
    assert dumpfile.dumps(dumpfile.parse(SPEC_OUTPUT, strict=True)) == SPEC_OUTPUT


# -- 5. error messages ----------------------------------------------------------------------

DIR = b"40755"
SYMLINK = b"120777"
BIG_XATTR_TEXT = 65535  # longer xattr sections are "Too many xattrs"

ERROR_CASES = [
    # (id, data, strict, message, line)
    ("no-root", ln(b"/a"), True, "Root node not present", 1),
    ("two-roots", ROOT + ROOT, True, "Can't have multiple roots", 2),
    ("root-not-dir", ln(b"/"), True, "Root must be a directory", 1),
    ("parent-missing", ROOT + ln(b"/x/y"), True, "Parent directory missing for /x/y", 2),
    (
        "parent-missing-deep",
        ROOT + ln(b"/d", DIR) + ln(b"/d/x/y/z"),
        True,
        "Parent directory missing for /d/x/y/z",
        3,
    ),
    (
        "parent-not-dir",
        ROOT + ln(b"/f") + ln(b"/f/y"),
        True,
        "Parent must be a directory for /f/y",
        3,
    ),
    (
        "parent-is-symlink",
        ROOT + ln(b"/l", SYMLINK, size=b"1", payload=b"d") + ln(b"/l/y"),
        True,
        "Parent must be a directory for /l/y",
        3,
    ),
    (
        "parent-is-hardlink",
        ROOT + ln(b"/f") + ln(b"/h", b"@100644", payload=b"/f") + ln(b"/h/y"),
        True,
        "Parent must be a directory for /h/y",
        4,
    ),
    (
        "no-hardlink-target",
        ROOT + ln(b"/h", b"@100644", payload=b"/nope"),
        True,
        "No target at /nope for hardlink",
        None,
    ),
    (
        "no-hardlink-target-escaped",
        ROOT + ln(b"/h", b"@100644", payload=rb"/no\x20pe"),
        True,
        "No target at /no pe for hardlink",
        None,
    ),
    (
        "no-hardlink-target-path",
        ROOT + ln(b"/h", b"@100644", payload=b"-"),
        True,
        "No target path for the hardlink",
        None,
    ),
    (
        "content-size",
        ROOT + ln(b"/f", size=b"5", content=b"abc"),
        True,
        "Invalid content size 3, must match size 5",
        2,
    ),
    (
        "content-size-escaped",
        ROOT + ln(b"/f", size=b"3", content=rb"a\x00"),
        True,
        "Invalid content size 2, must match size 3",
        2,
    ),
    (
        "content-size-empty",
        ROOT + ln(b"/f", size=b"1", content=b""),
        True,
        "Invalid content size 0, must match size 1",
        2,
    ),
    (
        "content-size-on-dir",  # checked for every file type
        ROOT + ln(b"/d", DIR, size=b"4096", content=b"x"),
        True,
        "Invalid content size 1, must match size 4096",
        2,
    ),
    (
        "devnum-on-regular",
        ROOT + ln(b"/f", rdev=b"5"),
        True,
        "Non-zero devnum on non-device",
        2,
    ),
    (
        "devnum-on-dir",
        ROOT + ln(b"/d", DIR, rdev=b"1"),
        True,
        "Non-zero devnum on non-device",
        2,
    ),
    (
        "symlink-size",
        ROOT + ln(b"/l", SYMLINK, size=b"7", payload=b"a"),
        True,
        "Invalid symlink size 1, must match size 7",
        2,
    ),
    (
        "symlink-content",
        ROOT + ln(b"/l", SYMLINK, size=b"1", payload=b"a", content=b"b"),
        True,
        "Symlink cannot have content",
        2,
    ),
    ("symlink-no-target", ROOT + ln(b"/l", SYMLINK), True, "Invalid symlink", 2),
    (
        "symlink-empty-target",
        ROOT + ln(b"/l", SYMLINK, payload=b""),
        True,
        "Invalid symlink",
        2,
    ),
    (
        "symlink-long-target",
        ROOT + ln(b"/l", SYMLINK, size=b"4096", payload=b"a" * 4096),
        True,
        "Invalid symlink",
        2,
    ),
    ("payload-long", ROOT + ln(b"/f", payload=b"a" * 4096), True, "Invalid payload", 2),
    (
        "inline-too-big",
        ROOT + ln(b"/f", size=b"5001", content=b"a" * 5001),
        True,
        "Inline content size 5001 exceeds maximum 5000",
        2,
    ),
    ("xattr-no-eq", ROOT + ln(b"/f", xattrs=[b"user.x"]), True, "Missing = in xattr", 2),
    (
        "xattr-second-no-eq",
        ROOT + ln(b"/f", xattrs=[b"user.x=1", b"user.y"]),
        True,
        "Missing = in xattr",
        2,
    ),
    (
        "two-trailing-spaces",
        ROOT + ln(b"/f", digest=b"-  "),
        True,
        "Missing = in xattr",
        2,
    ),
    ("int-size", ROOT + ln(b"/f", size=b"abc"), True, "Invalid integer abc", 2),
    ("int-size-trailing", ROOT + ln(b"/f", size=b"12x"), True, "Invalid integer 12x", 2),
    ("int-size-empty", ROOT + ln(b"/f", size=b""), True, "Invalid integer ", 2),
    ("int-nlink", ROOT + ln(b"/f", nlink=b"1.0"), True, "Invalid integer 1.0", 2),
    ("int-uid", ROOT + ln(b"/f", uid=b"x"), True, "Invalid integer x", 2),
    ("int-sign-only", ROOT + ln(b"/f", uid=b"-"), True, "Invalid integer -", 2),
    ("int-gid", ROOT + ln(b"/f", uid=b"0", gid=b"g"), True, "Invalid integer g", 2),
    ("int-rdev", ROOT + ln(b"/f", uid=b"0", rdev=b"r"), True, "Invalid integer r", 2),
    ("int-mode", ROOT + ln(b"/f", b"100648"), True, "Invalid integer 100648", 2),
    ("int-mode-empty", ROOT + ln(b"/f", b"@"), True, "Invalid integer ", 2),
    ("mtime-no-dot", ROOT + ln(b"/f", mtime=b"5"), True, "Invalid integer ", 2),
    ("mtime-bad-sec", ROOT + ln(b"/f", mtime=b"x.0"), True, "Invalid integer x", 2),
    ("mtime-bad-nsec", ROOT + ln(b"/f", mtime=b"1.2.3"), True, "Invalid integer 2.3", 2),
    ("only-path", ROOT + b"/f\n", True, "Invalid integer ", 2),
    ("empty-line", ROOT + b"\n" + ln(b"/f"), True, "Invalid empty path", 2),
    ("only-newline", b"\n", True, "Invalid empty path", 1),
    ("nul-path", ROOT + ln(rb"\x00abc"), True, "Invalid empty path", 2),
    ("no-files", b"", True, "No files in dump file", None),
    ("no-files-lenient", b"", False, "No files in dump file", None),
    (
        "no-newline",
        ROOT + ln(b"/f", newline=False),
        True,
        "Missing trailing newline",
        2,
    ),
    ("no-newline-root", ROOT[:-1], True, "Missing trailing newline", 1),
    (
        "nul",
        ROOT + ln(b"/ab\0c"),
        True,
        "Invalid embedded NUL character at position 3",
        2,
    ),
    (
        "nul-late",
        ROOT + ln(b"/f", xattrs=[b"user.a=\0"]),
        True,
        f"Invalid embedded NUL character at position {len(ln(b'/f', newline=False)) + 8}",
        2,
    ),
    (
        "too-many-xattrs",
        ROOT + ln(b"/f", xattrs=[b"user.a=" + b"x" * (BIG_XATTR_TEXT + 1 - 7)]),
        True,
        "Too many xattrs",
        2,
    ),
    (
        "too-many-xattrs-many-pieces",
        ROOT + ln(b"/f", xattrs=[b"u.%05d=" % i + b"y" * 20 for i in range(2500)]),
        True,
        "Too many xattrs",
        2,
    ),
    ("xattr-empty-key", ROOT + ln(b"/f", xattrs=[b"=somevalue"]), True, "Can't set xattr", 2),
    (
        "xattr-key-nul",
        ROOT + ln(b"/f", xattrs=[rb"\x00user.a=v"]),
        True,
        "Can't set xattr",
        2,
    ),
    (
        "xattr-key-256",
        ROOT + ln(b"/f", xattrs=[b"u" * 256 + b"=v"]),
        True,
        "Can't set xattr",
        2,
    ),
    (
        # 12 + 7 + len("user.a") + 32743 = 32768 > 32767; the text is < 65536 bytes
        "xattr-budget-single",
        ROOT + ln(b"/f", xattrs=[b"user.a=" + b"v" * 32743]),
        True,
        "Can't set xattr",
        2,
    ),
    (
        "xattr-budget-exactly-too-many-text",
        ROOT + ln(b"/f", xattrs=[b"user.a=" + b"x" * (BIG_XATTR_TEXT - 7)]),
        True,
        "Can't set xattr",
        2,
    ),
    (
        "xattr-budget-two",
        ROOT + ln(b"/f", xattrs=[b"user.a=" + b"v" * 16000, b"user.b=" + b"v" * 16730]),
        True,
        "Can't set xattr",
        2,
    ),
    (
        "xattr-budget-replace",  # like should-fail-honggfuzz-long-xattr
        ln(b"/", DIR, xattrs=[b"user.foo2=a", b"user.foo2=" + b"b" * 34000]),
        True,
        "Can't set xattr",
        1,
    ),
    ("mode-644", ROOT + ln(b"/f", b"644"), True, "Invalid mode 644", 2),
    ("mode-0", ROOT + ln(b"/f", b"0"), True, "Invalid mode 0", 2),
    ("mode-bad-type", ROOT + ln(b"/f", b"170644"), True, "Invalid mode 170644", 2),
    ("mode-hardlink-644", ROOT + ln(b"/f", b"@644"), True, "Invalid mode 644", 2),
    ("mode-root", ln(b"/", b"755"), True, "Invalid mode 755", 1),
    (
        "dir-hardlink",
        ROOT + ln(b"/d", b"@40555", payload=b"/"),
        True,
        "Directories can't be hardlinked",
        2,
    ),
    (
        "self-hardlink",
        ROOT + ln(b"/h", b"@100644", payload=b"/h"),
        True,
        "Self-referential hardlink /h",
        None,
    ),
    (
        "self-hardlink-slashes",
        ROOT + ln(b"/h", b"@100644", payload=b"//h"),
        True,
        "Self-referential hardlink //h",
        None,
    ),
    ("dot", ROOT + ln(b"/."), True, "Invalid . or .. in path: /.", 2),
    ("dotdot", ROOT + ln(b"/.."), True, "Invalid . or .. in path: /..", 2),
    (
        "dotdot-nested",
        ROOT + ln(b"/d", DIR) + ln(b"/d/..", DIR),
        True,
        "Invalid . or .. in path: /d/..",
        3,
    ),
    ("empty-name", ROOT + ln(b"//"), True, "Can't add child", 2),
    ("trailing-slash", ROOT + ln(b"/d", DIR) + ln(b"/d/"), True, "Can't add child", 3),
    ("name-too-long", ROOT + ln(b"/" + b"n" * 256), True, "Can't add child", 2),
    (
        "name-too-long-nested",
        ROOT + ln(b"/d", DIR) + ln(b"/d/" + b"n" * 256),
        True,
        "Can't add child",
        3,
    ),
]

ERROR_PARAMS = [
    pytest.param(data, strict, message, line, id=case_id)
    for case_id, data, strict, message, line in ERROR_CASES
] + [
    pytest.param(
        ROOT + ln(b"/a") + ln(b"/a"),
        True,
        "Can't add child",
        3,
        id="duplicate-file",
    ),
    pytest.param(
        ROOT + ln(b"/d", DIR) + ln(b"/d", DIR),
        True,
        "Can't add child",
        3,
        id="duplicate-dir",
    ),
    pytest.param(
        ROOT + ln(b"/d", DIR) + ln(b"/d/x") + ln(b"//d//x"),
        True,
        "Can't add child",
        4,
        id="duplicate-noncanonical",
    ),
]


@pytest.mark.parametrize(("data", "strict", "message", "line"), ERROR_PARAMS)
def test_parse_error(data: bytes, strict: bool, message: str, line: int | None) -> None:
    err = parse_error(data, strict=strict)
    assert err.message == message
    assert err.line == line
    where = "<dump>" if line is None else f"<dump>:{line}"
    assert str(err) == f"{where}: {message}"


def test_duplicate_name_is_rejected() -> None:
    """Whatever the wording, a duplicate name is an error on the right line."""
    err = parse_error(ROOT + ln(b"/a") + ln(b"/a"), strict=False)
    assert err.line == 3


def test_hardlink_errors_reported_in_reverse_order() -> None:
    """§3.4: queued hardlinks are resolved last line first."""
    data = ROOT + ln(b"/h1", b"@100644", payload=b"/x1") + ln(b"/h2", b"@100644", payload=b"/x2")
    assert parse_error(data, strict=True).message == "No target at /x2 for hardlink"
    data = ROOT + ln(b"/h1", b"@100644", payload=b"/x1") + ln(b"/h2", b"@100644", payload=b"-")
    assert parse_error(data, strict=True).message == "No target path for the hardlink"


def test_line_errors_come_before_missing_newline() -> None:
    data = ROOT + ln(b"/f", b"644") + ln(b"/g", newline=False)
    err = parse_error(data, strict=True)
    assert (err.message, err.line) == ("Invalid mode 644", 2)


# Strict-only checks: accepted leniently, with the documented effect.


def test_lenient_accepts_devnum_on_non_device() -> None:
    tree = dumpfile.parse(ROOT + ln(b"/f", rdev=b"5"), strict=False)
    assert node_at(tree, b"/f").rdev == 0


def test_lenient_accepts_symlink_size_mismatch() -> None:
    tree = dumpfile.parse(ROOT + ln(b"/l", SYMLINK, size=b"7", payload=b"a"), strict=False)
    link = node_at(tree, b"/l")
    assert link.payload == b"a"
    assert link.size == 1  # the target length, not SIZE


def test_lenient_accepts_symlink_content() -> None:
    data = ROOT + ln(b"/l", SYMLINK, size=b"1", payload=b"a", content=b"b")
    link = node_at(dumpfile.parse(data, strict=False), b"/l")
    assert link.payload == b"a"
    assert link.size == 1


def test_symlink_empty_content_is_not_content() -> None:
    """An empty CONTENT is no content; it must still match SIZE (checked first)."""
    data = ROOT + ln(b"/l", SYMLINK, size=b"0", payload=b"a", content=b"")
    link = node_at(dumpfile.parse(data, strict=False), b"/l")
    assert (link.payload, link.size, link.content) == (b"a", 1, None)
    err = parse_error(data, strict=True)
    assert (err.message, err.line) == ("Invalid symlink size 1, must match size 0", 2)


def test_lenient_parses_last_line_without_newline() -> None:
    tree = dumpfile.parse(ROOT + ln(b"/f", size=b"2", content=b"hi", newline=False), strict=False)
    assert node_at(tree, b"/f").content == b"hi"
    tree = dumpfile.parse(ROOT[:-1], strict=False)
    assert tree.root.entries == {}


def test_trailing_space_is_harmless() -> None:
    tree = dumpfile.parse(ROOT + ln(b"/f", digest=b"- "), strict=True)
    assert node_at(tree, b"/f").xattrs == {}


def test_xattr_limits_accepted_at_the_boundary() -> None:
    data = ROOT + ln(
        b"/f",
        xattrs=[
            b"u" * 255 + b"=",  # key of 255 bytes, empty value
            rb"user.nul\x00ignored=v",  # the key is a C string
            b"user.eq=a=b",  # split at the first '='
        ],
    )
    f = node_at(dumpfile.parse(data, strict=True), b"/f")
    assert f.xattrs == {b"u" * 255: b"", b"user.nul": b"v", b"user.eq": b"a=b"}

    # 12 + 7 + 6 + 32742 == 32767: exactly the budget
    data = ROOT + ln(b"/f", xattrs=[b"user.a=" + b"v" * 32742])
    f = node_at(dumpfile.parse(data, strict=True), b"/f")
    assert len(f.xattrs[b"user.a"]) == 32742

    # A replacement first gives back the old entry's cost.
    data = ROOT + ln(b"/f", xattrs=[b"user.a=" + b"v" * 32742, b"user.a=" + b"w" * 32742])
    f = node_at(dumpfile.parse(data, strict=True), b"/f")
    assert f.xattrs == {b"user.a": b"w" * 32742}

    # Two entries: 12 + (7 + 6 + 16000) + (7 + 6 + 16729) == 32767
    data = ROOT + ln(b"/f", xattrs=[b"user.a=" + b"v" * 16000, b"user.b=" + b"v" * 16729])
    f = node_at(dumpfile.parse(data, strict=True), b"/f")
    assert set(f.xattrs) == {b"user.a", b"user.b"}


def test_optional_fields_dash_empty_and_escaped() -> None:
    data = (
        ROOT
        + ln(b"/a", payload=b"-", content=b"-")
        + ln(b"/b", payload=b"")
        + ln(b"/c", size=b"1", payload=rb"\x2d", content=rb"\x2d")
        + ln(b"/d", size=b"0", content=b"")
    )
    tree = dumpfile.parse(data, strict=True)
    assert node_at(tree, b"/a").payload is None
    assert node_at(tree, b"/b").payload == b""
    assert node_at(tree, b"/c").payload == b"-"
    assert node_at(tree, b"/c").content == b"-"
    assert node_at(tree, b"/d").content is None  # an empty content is the same as none


def test_c_string_fields() -> None:
    """§2.1: PATH and xattr keys end at an escaped NUL; CONTENT and xattr values keep it."""
    data = ROOT + ln(rb"/ab\x00cd", size=b"3", content=rb"a\x00b", xattrs=[rb"user.k\x00z=\x00v"])
    tree = dumpfile.parse(data, strict=True)
    assert tree.root.entries is not None
    assert list(tree.root.entries) == [b"ab"]
    f = node_at(tree, b"/ab")
    assert f.content == b"a\x00b"
    assert f.xattrs == {b"user.k": b"\x00v"}
    assert dumpfile.dumps(tree).splitlines()[1] == (
        rb"/ab 3 100644 1 0 0 0 0.0 - a\x00b - user.k=\x00v"
    )


def test_paths_leading_and_repeated_slashes() -> None:
    data = ROOT + ln(b"/d", DIR) + ln(b"d//e", DIR) + ln(b"///d/e//f")
    tree = dumpfile.parse(data, strict=True)
    assert node_at(tree, b"/d/e/f").mode == S_IFREG | 0o644
    assert rb"/d/e/f " in dumpfile.dumps(tree)


def test_hardlink_line_fields_are_ignored() -> None:
    """§3.1 step 7: nothing but PATH, MODE and PAYLOAD is used on an @ line."""
    data = (
        ROOT
        + ln(b"/f", size=b"3", content=b"abc", uid=b"7")
        + ln(
            b"/h",
            b"@100644",
            size=b"garbage",
            nlink=b"x",
            uid=b"y",
            gid=b"z",
            rdev=b"9",
            mtime=b"nope",
            payload=b"/f",
            content=b"bad-size",
            digest=b"zz",
            xattrs=[b"no-equals"],
        )
    )
    tree = dumpfile.parse(data, strict=True)
    f = node_at(tree, b"/f")
    assert node_at(tree, b"/h") is f
    assert (f.uid, f.content, f.xattrs) == (7, b"abc", {})


def test_regular_hardlink_may_point_at_directory() -> None:
    """§3.4 quirk: a regular-mode @ line pointing at a directory is accepted."""
    data = ROOT + ln(b"/d", DIR) + ln(b"/h", b"@100644", payload=b"/d")
    tree = dumpfile.parse(data, strict=True)
    assert node_at(tree, b"/h") is node_at(tree, b"/d")


# -- 6. numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "attr", "expected"),
    [
        ({"size": b"+5"}, "size", 5),
        ({"size": b"\t5"}, "size", 5),  # leading whitespace other than space
        ({"size": b"007"}, "size", 7),
        ({"size": b"-1"}, "size", 2**64 - 1),
        ({"size": b"99999999999999999999999"}, "size", 2**64 - 1),  # saturates
        ({"uid": b"-1"}, "uid", 4294967295),
        ({"uid": b"+42"}, "uid", 42),
        ({"gid": b"4294967296"}, "gid", 0),  # truncated to 32 bits
        ({"gid": b"4294967297"}, "gid", 1),
        ({"nlink": b"-2"}, "nlink", 4294967294),
        ({"mtime": b"-5.0"}, "mtime_sec", -5),
        ({"mtime": b"1.1"}, "mtime_nsec", 1),
        ({"mtime": b"1.1"}, "mtime_sec", 1),
        ({"mtime": b"1.000000001"}, "mtime_nsec", 1),
        ({"mtime": b"0.4294967297"}, "mtime_nsec", 1),  # not range-checked, 32 bits
        ({"mtime": b"0.1999999999"}, "mtime_nsec", 1999999999),
        ({"mtime": b"+3.-1"}, "mtime_nsec", 4294967295),
        ({"mtime": b"18446744073709551615.0"}, "mtime_sec", -1),
        ({"mtime": b"9223372036854775808.0"}, "mtime_sec", -(2**63)),
    ],
)
def test_numbers_strtoull(fields: dict[str, bytes], attr: str, expected: int) -> None:
    tree = dumpfile.parse(ROOT + ln(b"/f", **fields), strict=True)
    assert getattr(node_at(tree, b"/f"), attr) == expected


def test_mode_octal_and_rdev() -> None:
    data = (
        ROOT
        + ln(b"/a", b"+100644")
        + ln(b"/b", b"0100600")
        + ln(b"/c", b"20644", rdev=b"259")
        + ln(b"/e", b"60600", rdev=b"-1")
        + ln(b"/s", b"140755")
        + ln(b"/p", b"10644")
        + ln(b"/w", b"@100644", payload=b"/a")
    )
    tree = dumpfile.parse(data, strict=True)
    assert node_at(tree, b"/a").mode == 0o100644
    assert node_at(tree, b"/b").mode == 0o100600
    assert node_at(tree, b"/c").rdev == 259
    assert node_at(tree, b"/c").mode == S_IFCHR | 0o644
    assert node_at(tree, b"/e").mode == S_IFBLK | 0o600
    assert node_at(tree, b"/e").rdev & 0xFFFFFFFF == 0xFFFFFFFF
    assert node_at(tree, b"/s").mode == S_IFSOCK | 0o755
    assert node_at(tree, b"/p").mode == 0o010644
    assert node_at(tree, b"/w") is node_at(tree, b"/a")


def test_non_canonical_spelling_gives_same_tree() -> None:
    """Signs and leading zeros are spelling only: the tree equals the canonical one."""
    canonical = ROOT + ln(b"/f", uid=b"5", gid=b"6", mtime=b"7.8", payload=b"p")
    spelled = ROOT + ln(b"/f", b"0100644", uid=b"+5", gid=b"06", mtime=b"+7.08", payload=b"p")
    assert signature(dumpfile.parse(canonical, strict=True)) == signature(
        dumpfile.parse(spelled, strict=True)
    )


# -- 7. hardlink resolution -----------------------------------------------------------------


def test_hardlink_cycle_is_eloop() -> None:
    data = ROOT + ln(b"/a", b"@100644", payload=b"/b") + ln(b"/b", b"@100644", payload=b"/a")
    with pytest.raises(TreeError) as exc:
        dumpfile.parse(data, strict=True)
    assert exc.value.errno == errno.ELOOP


def test_hardlink_cycle_of_three_is_eloop() -> None:
    data = (
        ROOT
        + ln(b"/a", b"@100644", payload=b"/b")
        + ln(b"/b", b"@100644", payload=b"/c")
        + ln(b"/c", b"@100644", payload=b"/a")
    )
    with pytest.raises(TreeError) as exc:
        dumpfile.parse(data, strict=True)
    assert exc.value.errno == errno.ELOOP


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_hardlink_to_hardlink_resolves_to_final_target(order: str) -> None:
    target = ln(b"/f", size=b"2", content=b"hi", nlink=b"3")
    first = ln(b"/h1", b"@100644", payload=b"/f")
    second = ln(b"/h2", b"@100644", payload=b"/h1")
    links = first + second if order == "forward" else second + first
    tree = dumpfile.parse(ROOT + target + links, strict=True)
    f = node_at(tree, b"/f")
    assert node_at(tree, b"/h1") is f
    assert node_at(tree, b"/h2") is f
    assert f.nlink == 3


def test_hardlink_target_before_link_and_in_subdir() -> None:
    data = (
        ROOT
        + ln(b"/a", b"@100644", payload=b"//d//f")
        + ln(b"/d", DIR)
        + ln(b"/d/f", size=b"1", content=b"x")
        + ln(b"/d/g", b"@100644", payload=b"d/f")
    )
    tree = dumpfile.parse(data, strict=True)
    f = node_at(tree, b"/d/f")
    assert node_at(tree, b"/a") is f
    assert node_at(tree, b"/d/g") is f


# -- 8. strict mode from the environment ----------------------------------------------------

UNTERMINATED = ROOT + ln(b"/f", newline=False)


def test_strict_from_env_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CFS_PARSE_STRICT", "1")
    err = parse_error(UNTERMINATED, strict=None)
    assert err.message == "Missing trailing newline"
    with pytest.raises(DumpfileError):
        dumpfile.parse(UNTERMINATED)
    # an explicit argument wins over the environment
    assert node_at(dumpfile.parse(UNTERMINATED, strict=False), b"/f")


def test_strict_from_env_any_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CFS_PARSE_STRICT", "")  # set, even if empty
    with pytest.raises(DumpfileError, match="Non-zero devnum on non-device"):
        dumpfile.parse(ROOT + ln(b"/f", rdev=b"1"))


def test_lenient_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CFS_PARSE_STRICT", raising=False)
    tree = dumpfile.parse(UNTERMINATED)
    assert node_at(tree, b"/f").mode == S_IFREG | 0o644
    assert node_at(dumpfile.parse(ROOT + ln(b"/f", rdev=b"1")), b"/f").rdev == 0
    with pytest.raises(DumpfileError, match="Missing trailing newline"):
        dumpfile.parse(UNTERMINATED, strict=True)


# -- 9. dumps() of hardlinks ----------------------------------------------------------------


def test_dumps_hardlink_first_seen_path_in_full() -> None:
    root = Inode(S_IFDIR | 0o755, nlink=2, size=4096, mtime_sec=1)
    f = Inode(
        S_IFREG | 0o644,
        nlink=2,
        uid=5,
        gid=6,
        size=3,
        content=b"abc",
        mtime_sec=7,
        mtime_nsec=9,
        xattrs={b"user.k": b"v"},
    )
    root.add(b"z", f)  # home of the inode, but visited last
    root.add(b"b", f)
    out = dumpfile.dumps(Tree(root))
    assert out == (
        b"/ 4096 40755 2 0 0 0 1.0 - - -\n"
        b"/b 3 100644 2 5 6 0 7.9 - abc - user.k=v\n"
        b"/z 3 @100644 2 5 6 0 7.9 /b abc - user.k=v\n"
    )
    back = dumpfile.parse(out, strict=True)
    assert node_at(back, b"/z") is node_at(back, b"/b")
    assert signature(back) == signature(Tree(root))


def test_dumps_hardlink_across_directories() -> None:
    root = Inode(S_IFDIR | 0o755)
    d = root.add(b"d", Inode(S_IFDIR | 0o700))
    ext = Inode(S_IFREG | 0o600, size=10000, payload=b"56/" + DIGEST_HEX[2:])
    ext.digest = bytes.fromhex(DIGEST_HEX.decode())
    dev = Inode(S_IFBLK | 0o600, rdev=0x0801)
    d.add(b"x", ext)
    d.add(b"dev", dev)
    root.add(b"a", ext)
    root.add(b"z", dev)
    root.add(b"a b", dev)
    lines = dumpfile.dumps(Tree(root)).splitlines()
    assert [line.split(b" ")[:3] for line in lines] == [
        [b"/", b"0", b"40755"],
        [b"/a", b"10000", b"100600"],
        [rb"/a\x20b", b"0", b"60600"],
        [b"/d", b"0", b"40700"],
        [b"/d/dev", b"0", b"@60600"],
        [b"/d/x", b"10000", b"@100600"],
        [b"/z", b"0", b"@60600"],
    ]
    # PAYLOAD of an @ line is the first path (escaped); the rest repeats the target's fields.
    assert lines[4] == rb"/d/dev 0 @60600 1 0 0 2049 0.0 /a\x20b - -"
    assert lines[5] == b"/d/x 10000 @100600 1 0 0 0 0.0 /a - " + DIGEST_HEX
    assert lines[6] == rb"/z 0 @60600 1 0 0 2049 0.0 /a\x20b - -"
    back = dumpfile.parse(b"\n".join(lines) + b"\n", strict=True)
    assert node_at(back, b"/d/x") is node_at(back, b"/a")
    assert node_at(back, b"/z") is node_at(back, b"/d/dev") is node_at(back, b"/a b")
    assert node_at(back, b"/a").digest == ext.digest


def test_dumps_symlink_and_devices_fields() -> None:
    root = Inode(S_IFDIR | 0o755)
    root.add(b"l", Inode(S_IFLNK | 0o777, size=3, payload=b"a b"))
    root.add(b"c", Inode(S_IFCHR | 0o600, rdev=0x0103, mtime_sec=-5, mtime_nsec=1))
    out = dumpfile.dumps(Tree(root)).splitlines()
    assert out[1] == b"/c 0 20600 1 0 0 259 -5.1 - - -"
    assert out[2] == rb"/l 3 120777 1 0 0 0 0.0 a\x20b - -"


# -- DIGEST (§3.7: a Python implementation accepts exactly 64 hex digits) -------------------


def test_digest_any_case_accepted() -> None:
    data = ROOT + ln(b"/f", size=b"1", digest=DIGEST_HEX.upper())
    f = node_at(dumpfile.parse(data, strict=True), b"/f")
    assert f.digest == bytes.fromhex(DIGEST_HEX.decode())


@pytest.mark.parametrize(
    "digest", [b"ab", DIGEST_HEX[:-1], DIGEST_HEX + b"0", DIGEST_HEX[:-1] + b"g"]
)
def test_digest_not_64_hex_digits_rejected(digest: bytes) -> None:
    err = parse_error(ROOT + ln(b"/f", size=b"1", digest=digest), strict=True)
    assert err.line == 2
