"""Hostile images: the reader must fail with FormatError, never anything else.

The requirement: any malformed image gives :class:`~composefs.errors.FormatError` naming
an offset or an inode, never an unhandled exception, a hang, unbounded recursion or memory
growth past a small multiple of the image size; ``composefs-info dump`` then exits 1 with
one line on stderr.  Directory cycles and hardlinked directories may load, but finitely.

Each case patches one valid image at a precise place found through the reader's own API
(``Image.lookup`` gives the nid, xattr and tail offsets of an inode).  Cases that show a
reader bug are kept, marked ``xfail(strict=True)`` with the bug in the reason: fixing the
bug turns them into XPASS failures, and then the marker goes.

The second half runs ``tests/mutate_images.py`` in a subprocess under ``RLIMIT_AS``:
a few thousand seeded random mutants of valid images, the same invariant.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import REPO, UPSTREAM
from mutate_images import dir_chunks, exercise

from composefs import dumpfile
from composefs.erofs import format as fmt
from composefs.erofs.reader import Image, ImageInode, load_tree
from composefs.erofs.writer import build_image
from composefs.errors import FormatError
from composefs.tree import Tree

BIN = Path(sys.executable).parent
INFO = BIN / "composefs-info"
MUTATOR = Path(__file__).resolve().parent / "mutate_images.py"
SB = fmt.EROFS_SUPER_OFFSET
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
DIGEST = "d1" * 32
LOAD_SECONDS = 20  # a hostile image must be refused (or loaded) well within this

# -- valid base images ---------------------------------------------------------------------------


def _base_dump(extended: bool) -> bytes:
    """Every structure the reader handles: dirs with blocks and tails, inline, block and
    external files, a file of 8 TB, shared and inline xattrs, a hardlink, devices,
    symlinks.  With ``extended`` every inode but the root gets a 64-byte inode."""
    t = "1700000001.0" if extended else "1700000000.0"
    payload = f"{DIGEST[:2]}/{DIGEST[2:]}"
    lines = [
        "/ 4096 40755 5 0 0 0 1700000000.0 - - - user.root=r",
        f"/big 4096 40755 2 0 0 0 {t} - - -",
        *(f"/big/entry-{i:03d}-padding-name 0 100644 1 0 0 0 {t} - - -" for i in range(300)),
        f"/data 4096 40755 2 0 0 0 {t} - - - user.shared=same",
        f"/data/small 5 100644 2 0 0 0 {t} - hello - user.a=1 user.shared=same",
        f"/data/block 3000 100644 1 0 0 0 {t} - {'a' * 3000} - user.shared=same",
        f"/data/blocktail 4500 100644 1 0 0 0 {t} - {'b' * 4500} -",
        f"/data/ext 1200 100644 1 0 0 0 {t} {payload} - {DIGEST}",
        f"/data/huge 9000000000000 100644 1 0 0 0 {t} {payload} - {DIGEST}",
        "/data/link 0 @100644 0 0 0 0 0.0 /data/small - -",
        f"/data/chr 0 20644 1 0 0 1025 {t} - - -",
        f"/data/fifo 0 10644 1 0 0 0 {t} - - -",
        f"/sym 6 120777 1 0 0 0 {t} target - -",
        f"/longsym 4000 120777 1 0 0 0 {t} {'x' * 4000} - -",
        f"/usr 4096 40755 3 0 0 0 {t} - - -",
        f"/usr/bin 4096 40755 2 0 0 0 {t} - - -",
        f"/usr/bin/sh 0 100755 1 0 0 0 {t} - - -",
    ]
    return ("\n".join(sorted(lines)) + "\n").encode()


@functools.cache
def base_image(kind: str) -> bytes:
    if kind == "compact":
        return build_image(dumpfile.parse(_base_dump(False), strict=True))
    if kind == "extended":
        return build_image(dumpfile.parse(_base_dump(True), strict=True))
    if kind == "demo":
        return build_image(dumpfile.parse((REPO / "examples/demo.dump").read_bytes(), strict=True))
    if kind == "last-block-partial":
        # the last data block is a 3000-byte file: 1096 bytes of padding end the image
        text = f"/ 4096 40755 2 0 0 0 0.0 - - -\n/f 3000 100644 1 0 0 0 0.0 - {'c' * 3000} -\n"
        return build_image(dumpfile.parse(text.encode(), strict=True))
    if kind == "many-dirs":
        text = "/ 4096 40755 2002 0 0 0 0.0 - - -\n" + "".join(
            f"/d{i:04d} 4096 40755 2 0 0 0 0.0 - - -\n" for i in range(2000)
        )
        return build_image(dumpfile.parse(text.encode(), strict=True))
    upstream = {
        "special": ("special.dump", True, {"min_version": 0, "max_version": 0}),
        "longlink": ("longlink.dump", False, {}),
        "config-hard-link": ("config-with-hard-link.dump.gz", True, {}),
    }
    name, strict, kw = upstream[kind]
    path = UPSTREAM / name
    if not path.exists():
        pytest.skip(f"upstream asset {path} not found (../shared absent)")
    raw = path.read_bytes()
    text = gzip.decompress(raw) if name.endswith(".gz") else raw
    return build_image(dumpfile.parse(text, strict=strict), **kw)


class Dirent(NamedTuple):
    chunk: int  # absolute offset of the directory chunk (block or inline tail)
    length: int  # chunk length
    index: int  # record number in the chunk
    record: int  # absolute offset of the 12-byte record
    nameoff: int
    name: bytes
    nid: int


class Patch:
    """A valid image being edited; offsets come from the reader's lookups on the original."""

    def __init__(self, kind: str = "compact") -> None:
        self.orig = base_image(kind)
        self.buf = bytearray(self.orig)
        self.img = Image(self.orig)
        self.size = len(self.orig)

    def ino(self, path: str) -> ImageInode:
        ino = self.img.lookup(path)
        assert ino is not None, path
        return ino

    def nid(self, path: str) -> int:
        return self.ino(path).nid

    def off(self, path: str) -> int:
        """Byte offset of the inode of ``path``."""
        return self.img.header.meta_offset + self.nid(path) * fmt.SLOT_SIZE

    def put(self, offset: int, code: str, value: int) -> Patch:
        struct.pack_into("<" + code, self.buf, offset, value)
        return self

    def put_bytes(self, offset: int, raw: bytes) -> Patch:
        self.buf[offset : offset + len(raw)] = raw
        return self

    def truncate(self, length: int, *, fix_blocks: bool = True) -> Patch:
        """Cut the image; by default also lower the superblock's block count to match, so
        the cut is found by the structure that runs past the end, not by the header."""
        del self.buf[length:]
        if fix_blocks:
            self.put(SB + 36, "I", length // fmt.BLOCK_SIZE)
        return self

    def near(self, limit: int, path: str) -> int:
        """The largest size <= limit with the same inline tail length as ``path`` has, so
        a size check is met before the inline tail crosses its block."""
        tail = self.ino(path).size % fmt.BLOCK_SIZE
        return (limit - tail) // fmt.BLOCK_SIZE * fmt.BLOCK_SIZE + tail

    def dirents(self, path: str) -> list[Dirent]:
        out = []
        for chunk, length in dir_chunks(self.ino(path)):
            first = struct.unpack_from("<H", self.orig, chunk + 8)[0]
            records = [
                fmt.DIRENT.unpack_from(self.orig, r) for r in range(chunk, chunk + first, 12)
            ]
            for i, (nid, nameoff, _ftype, _r) in enumerate(records):
                end = records[i + 1][1] if i + 1 < len(records) else length
                name = self.orig[chunk + nameoff : chunk + end].split(b"\0")[0]
                out.append(Dirent(chunk, length, i, chunk + 12 * i, nameoff, name, nid))
        return out

    def dirent(self, path: str, name: bytes) -> Dirent:
        for d in self.dirents(path):
            if d.name == name:
                return d
        raise AssertionError(f"{name!r} not in {path}")

    def point(self, path: str, name: bytes, nid: int) -> Patch:
        """Make the entry ``name`` of directory ``path`` refer to inode ``nid``."""
        return self.put(self.dirent(path, name).record, "Q", nid)

    def data(self) -> bytes:
        return bytes(self.buf)


# -- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], bytes]
    match: str | None  # regex the FormatError message must contain; None: loads finitely
    bug: str | None = None  # a reader bug: the case is xfail(strict=True) with this reason
    cli_shows_bug: bool = True  # whether test_cli fails because of it too


CASES: list[Case] = []


def case(
    id: str, match: str | None, bug: str | None = None, cli_shows_bug: bool = True
) -> Callable[[Callable[[], bytes]], None]:
    def register(build: Callable[[], bytes]) -> None:
        CASES.append(Case(id, build, match, bug, cli_shows_bug))

    return register


def loads(id: str, bug: str | None = None) -> Callable[[Callable[[], bytes]], None]:
    """A structure that is legal to load (cycles, hardlinked directories): finitely."""
    return case(id, None, bug)


# Reader bugs these cases found in the reader of commit aa1000d and that the reader they
# were finished against fixes: an i_mode without a valid file type raised TreeError;
# Image._external_xattrs read a shared xattr index past the end of the image
# (struct.error); chunk-based inodes, inline tails crossing a block and the superblock's
# block count went unchecked; a bad shared xattr of an external file was reported as
# "inode -1".  All fixed.
#
# Deliberately not checked: the chunk addresses of external files.  Their data never comes
# from the image (overlayfs reads the object), and when the reference moves a large chunk
# array out of the inode (format.md §9, the bigfile-xattr asset) the place the kernel reads
# it from holds the next inode's bytes: validating them would refuse valid images.

# ---- header and superblock


@case("empty-file", r"too small")
def _() -> bytes:
    return b""


@case("shorter-than-a-block", r"too small")
def _() -> bytes:
    return Patch().truncate(fmt.BLOCK_SIZE - 1).data()


@case("bad-composefs-magic", r"bad composefs magic")
def _() -> bytes:
    return Patch().put(0, "I", 0xDEADBEEF).data()


@case("bad-composefs-header-version", r"unsupported composefs header version 2")
def _() -> bytes:
    return Patch().put(4, "I", 2).data()


@case("bad-erofs-magic", r"bad EROFS superblock magic")
def _() -> bytes:
    return Patch().put(SB, "I", 0xE0F5E1E3).data()


for _bits in (0, 9, 13, 255):

    @case(f"blkszbits-{_bits}", rf"unsupported block size 2\^{_bits}")
    def _(bits: int = _bits) -> bytes:
        return Patch().put(SB + 12, "B", bits).data()


@case("meta-blkaddr-at-end", r"metadata area starts past the end")
def _() -> bytes:
    p = Patch()
    return p.put(SB + 40, "I", p.size // fmt.BLOCK_SIZE).data()


@case("xattr-blkaddr-u32-max", r"shared xattr area starts past the end")
def _() -> bytes:
    return Patch().put(SB + 44, "I", U32_MAX).data()


@case("root-nid-past-end", r"inode 65535 lies outside the image")
def _() -> bytes:
    return Patch().put(SB + 14, "H", 0xFFFF).data()


@case("root-nid-is-a-file", r"root inode \d+ is not a directory")
def _() -> bytes:
    p = Patch()
    return p.put(SB + 14, "H", p.nid("/data/small")).data()


@case("root-nid-misaligned-into-xattrs", r"inode 37|root inode")
def _() -> bytes:
    return Patch().put(SB + 14, "H", 37).data()  # the root's xattr area, read as an inode


# ---- inodes


@case("i-format-unknown-bits", r"unknown format bits 0x14")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data/small"), "H", 0x14).data()


for _layout in (1, 3, 5, 7):

    @case(f"data-layout-{_layout}", rf"unsupported data layout {_layout}")
    def _(layout: int = _layout) -> bytes:
        p = Patch()
        return p.put(p.off("/data/small"), "H", layout << 1).data()


@case("mode-without-file-type", r"inode \d+: invalid file type in mode 644")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data/small") + 4, "H", 0o644).data()


@case("mode-file-type-0o17", r"inode \d+: invalid file type in mode 170755")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/usr/bin/sh") + 4, "H", 0o170755).data()


@case("dirent-nid-u64-max", rf"inode {U64_MAX} lies outside")
def _() -> bytes:
    return Patch().point("/big", b"entry-000-padding-name", U64_MAX).data()


@case("dirent-nid-just-past-end", r"lies outside the image")
def _() -> bytes:
    p = Patch()
    return p.point("/big", b"entry-000-padding-name", p.size // 32).data()


@case("compact-inode-straddles-end", r"lies outside the image")
def _() -> bytes:
    p = Patch()
    p.point("/big", b"entry-000-padding-name", p.size // 32 - 1)
    return p.truncate(p.size - 16).data()


@case("extended-inode-straddles-end", r"lies outside the image")
def _() -> bytes:
    p = Patch()
    last = p.size - 32  # an extended i_format in the last 32 bytes: 64 bytes needed
    p.put(last, "H", 1)
    return p.point("/big", b"entry-000-padding-name", last // 32).data()


@case("xattr-icount-u16-max", r"xattrs run past the end of the image")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data/small") + 2, "H", 0xFFFF).data()


@case("shared-count-overflows-xattr-area", r"inode \d+: 255 shared xattrs overflow")
def _() -> bytes:
    p = Patch()
    return p.put(p.ino("/data/small").xattr_offset + 4, "B", 255).data()


def _inline_entry(p: Patch, path: str) -> int:
    """Offset of the first inline xattr entry of ``path``."""
    x = p.ino(path).xattr_offset
    return x + 12 + 4 * p.orig[x + 4]


@case("inline-xattr-name-overflows-area", r"inode \d+: xattr entry overflows its area")
def _() -> bytes:
    p = Patch()
    return p.put(_inline_entry(p, "/data/small"), "B", 255).data()


@case("inline-xattr-value-size-u16-max", r"inode \d+: xattr entry overflows its area")
def _() -> bytes:
    p = Patch()
    return p.put(_inline_entry(p, "/data/small") + 2, "H", 0xFFFF).data()


for _index in (7, 255):

    @case(f"inline-xattr-name-index-{_index}", rf"inode \d+: unknown xattr name index {_index}")
    def _(index: int = _index) -> bytes:
        p = Patch()
        return p.put(_inline_entry(p, "/data/small") + 1, "B", index).data()


@case("inline-xattr-empty-name", r"inode \d+: invalid xattr name b''")
def _() -> bytes:
    p = Patch()
    return p.put(_inline_entry(p, "/data/small"), "H", 0).data()  # name_len 0, index 0


# (on a directory: a regular file's xattrs take the external-file fast path, see below)


@case("shared-xattr-index-u32-max", r"inode \d+: xattr entry out of bounds")
def _() -> bytes:
    p = Patch()
    return p.put(p.ino("/data").xattr_offset + 12, "I", U32_MAX).data()


@case("shared-xattr-index-at-image-end", r"inode \d+: xattr entry out of bounds")
def _() -> bytes:
    p = Patch()
    index = (p.size - p.img.header.xattr_offset) // 4
    return p.put(p.ino("/data").xattr_offset + 12, "I", index).data()


@case("shared-xattr-entry-overruns-image", r"inode \d+: xattr entry overflows its area")
def _() -> bytes:
    p = Patch()
    at = p.size - 8
    p.put_bytes(at, fmt.XATTR_ENTRY.pack(4, fmt.EROFS_XATTR_INDEX_USER, 0xFFFF) + b"name")
    index = (at - p.img.header.xattr_offset) // 4
    return p.put(p.ino("/data").xattr_offset + 12, "I", index).data()


@case(
    "external-file-bad-shared-ref-names-inode",
    r"inode \d+: xattr entry out of bounds",
)
def _() -> bytes:
    p = Patch()
    # /data/ext shares its metacopy and redirect with /data/huge: keep one reference (the
    # external-file fast path) and make it point far past the end
    x = p.ino("/data/ext").xattr_offset
    assert p.orig[x + 4] == 2
    return p.put(x + 4, "B", 1).put(x + 12, "I", U32_MAX).data()


@case("external-file-shared-ref-past-image-end", r"inode \d+: 1 shared xattrs overflow")
def _() -> bytes:
    p = Patch()
    # A compact regular inode in the image's last 64 bytes with a 12-byte xattr area
    # (icount 1) that claims one shared reference, the image cut right after that area:
    # the reference would be at [end, end + 4).  (Once a struct.error: reader bug 2.)
    at = p.size - 64
    p.put_bytes(at, fmt.INODE_COMPACT.pack(0, 1, 0o100644, 1, 0, 0, 0, 0, 0, 0, 0))
    p.put_bytes(at + 32, fmt.XATTR_IBODY_HEADER.pack(0, 1))
    p.point("/big", b"entry-000-padding-name", at // 32)
    return p.truncate(at + 32 + 12).data()


# ---- regular files and symlinks


@case("inline-file-size-near-2^32", r"exceeds|overlap|outside")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data/small") + 8, "I", p.near(U32_MAX, "/data/small")).data()


@case("inline-file-size-near-2^64", r"exceeds|overlap|outside")
def _() -> bytes:
    p = Patch("extended")
    return p.put(p.off("/data/small") + 8, "Q", p.near(U64_MAX, "/data/small")).data()


@case("file-block-past-end", r"data blocks lie outside the image")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data/block") + 16, "I", 0xFFFF).data()


@case("inline-tail-crosses-block", r"inode \d+: inline data crosses a block boundary")
def _() -> bytes:
    p = Patch()
    ino = p.ino("/data/small")
    # a 2000-byte inline tail from the middle of a block runs into the next block
    assert ino.tail_offset % fmt.BLOCK_SIZE + 2000 > fmt.BLOCK_SIZE
    return p.put(p.off("/data/small") + 8, "I", 2000).data()


@case("symlink-path-max", r"symlink of 4096 bytes")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/longsym") + 8, "I", 4096).data()


@case("symlink-size-near-2^32", r"symlink of|overlap|outside")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/sym") + 8, "I", p.near(U32_MAX, "/sym")).data()


@case("symlink-size-near-2^64", r"symlink of|overlap|outside")
def _() -> bytes:
    p = Patch("extended")
    return p.put(p.off("/sym") + 8, "Q", p.near(U64_MAX, "/sym")).data()


@case("symlink-in-block-longer-than-path-max", r"symlink of 5000 bytes")
def _() -> bytes:
    p = Patch("extended")
    off = p.off("/sym")
    p.put(off, "H", (fmt.EROFS_INODE_FLAT_PLAIN << 1) | 1).put(off + 16, "I", 2)
    return p.put(off + 8, "Q", 5000).data()


@case("symlink-empty", r"empty symlink target")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/sym") + 8, "I", 0).data()


@case("symlink-target-starts-with-nul", r"empty symlink target")
def _() -> bytes:
    p = Patch()
    return p.put(p.ino("/sym").tail_offset, "B", 0).data()


@case("symlink-block-past-end", r"data blocks lie outside the image")
def _() -> bytes:
    p = Patch()
    off = p.off("/sym")
    return p.put(off, "H", fmt.EROFS_INODE_FLAT_PLAIN << 1).put(off + 16, "I", U32_MAX).data()


@case("symlink-chunk-based", r"expected a flat data layout|chunk-based layout on a non-file")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/sym"), "H", fmt.EROFS_INODE_CHUNK_BASED << 1).data()


# ---- chunk-based (external) files


@case("chunk-format-unknown-bits", r"inode \d+: unsupported chunk format 0x40")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data/ext") + 16, "I", 0x40).data()


@case("chunk-array-past-image-end-size-near-2^64", r"inode \d+: 2097152 chunk indexes run past")
def _() -> bytes:
    p = Patch("extended")
    # 2^21 chunks of 2^43 bytes: an 8 MiB chunk index array in a 64 KiB image
    return p.put(p.off("/data/huge") + 8, "Q", U64_MAX).data()


@case("directory-chunk-based", r"chunk-based layout")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data"), "H", fmt.EROFS_INODE_CHUNK_BASED << 1).data()


# ---- directories


@case("dir-size-near-2^32", r"data blocks lie outside the image")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/data") + 8, "I", p.near(U32_MAX, "/data")).data()


@case("dir-size-near-2^64", r"data blocks lie outside the image")
def _() -> bytes:
    p = Patch("extended")
    return p.put(p.off("/data") + 8, "Q", p.near(U64_MAX, "/data")).data()


@case("dir-block-address-u32-max", r"data blocks lie outside the image")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/big") + 16, "I", U32_MAX).data()


@case("dir-tail-shorter-than-a-record", r"truncated entry block")
def _() -> bytes:
    p = Patch()
    return p.put(p.off("/usr") + 8, "I", 11).data()


for _nameoff in (0, 11, 13):

    @case(f"dir-first-nameoff-{_nameoff}", rf"bad first name offset {_nameoff}")
    def _(nameoff: int = _nameoff) -> bytes:
        p = Patch()
        return p.put(p.dirents("/usr")[0].record + 8, "H", nameoff).data()


@case("dir-first-nameoff-past-tail", r"bad first name offset 48")
def _() -> bytes:
    p = Patch()
    first = p.dirents("/usr")[0]
    assert first.length < 48
    return p.put(first.record + 8, "H", 48).data()


@case("dir-first-nameoff-past-block", r"bad first name offset 4104")
def _() -> bytes:
    p = Patch()
    return p.put(p.dirents("/big")[0].record + 8, "H", 4104).data()


@case("dir-names-overlap", r"bad name offset")
def _() -> bytes:
    p = Patch()
    _dot, dotdot, bin_ = p.dirents("/usr")
    return p.put(dotdot.record + 8, "H", bin_.nameoff + 1).data()


@case("dir-name-offset-into-records", r"bad name offset")
def _() -> bytes:
    p = Patch()
    return p.put(p.dirents("/usr")[1].record + 8, "H", 12).data()


@case("dir-empty-name", r"bad name offset")
def _() -> bytes:
    p = Patch()
    _dot, dotdot, bin_ = p.dirents("/usr")
    return p.put(dotdot.record + 8, "H", bin_.nameoff).data()


@case("dir-last-name-past-chunk", r"bad name offset")
def _() -> bytes:
    p = Patch()
    last = p.dirents("/usr")[-1]
    return p.put(last.record + 8, "H", last.length).data()


@case("dir-last-name-overruns-name-max", r"invalid entry name")
def _() -> bytes:
    p = Patch()
    last = p.dirents("/")[-1]  # "usr", followed by the root block's zero padding
    start = last.chunk + last.nameoff + len(last.name)
    end = last.chunk + last.length
    assert end - start > 255
    return p.put_bytes(start, b"z" * (end - start)).data()


@case("dir-name-with-slash", r"invalid entry name b'b/n'")
def _() -> bytes:
    p = Patch()
    d = p.dirent("/usr", b"bin")
    return p.put_bytes(d.chunk + d.nameoff + 1, b"/").data()


@case("dir-name-with-nul", r"invalid entry name b'bl\\x00ck'")
def _() -> bytes:
    p = Patch()
    d = p.dirent("/data", b"block")
    return p.put_bytes(d.chunk + d.nameoff + 2, b"\0").data()


@case("dir-duplicate-names", r"duplicate entry b'entry-001-padding-name'")
def _() -> bytes:
    p = Patch()
    d = p.dirent("/big", b"entry-000-padding-name")
    return p.put_bytes(d.chunk + d.nameoff + 8, b"1").data()


# ---- cycles and hardlinked directories: may load, must stay finite


@loads("dir-cycle-to-root")
def _() -> bytes:
    p = Patch()
    return p.point("/usr/bin", b"sh", p.img.header.root_nid).data()


@loads("dir-cycle-to-parent")
def _() -> bytes:
    p = Patch()
    return p.point("/usr/bin", b"sh", p.nid("/usr")).data()


@loads("dir-contains-itself")
def _() -> bytes:
    p = Patch()
    return p.point("/usr/bin", b"sh", p.nid("/usr/bin")).data()


@loads("dotdot-renamed-to-a-name")
def _() -> bytes:
    p = Patch()
    d = p.dirent("/usr/bin", b"..")
    return p.put_bytes(d.chunk + d.nameoff, b"up").data()


@loads("hardlinked-directory")
def _() -> bytes:
    p = Patch()
    return p.point("/data", b"fifo", p.nid("/usr")).data()


@loads("one-directory-under-300-names")
def _() -> bytes:
    p = Patch()
    target = p.nid("/usr")
    for d in p.dirents("/big"):
        if d.name not in (b".", b".."):
            p.put(d.record, "Q", target)
    return p.data()


# ---- the work budget


@case("2000-dirs-share-the-root-blocks", r"structures overlap")
def _() -> bytes:
    """Every directory claims the root's blocks as its own: without a work budget the
    reader would read the root 2000 times and build 4 million entries."""
    p = Patch("many-dirs")
    root = p.img.root
    blocks = root.size - root.size % fmt.BLOCK_SIZE  # the root's full blocks, not its tail
    for name, nid, _t in p.img.iterdir(root):
        if name.startswith(b"d"):
            off = p.img.header.meta_offset + nid * 32
            p.put(off, "H", fmt.EROFS_INODE_FLAT_PLAIN << 1)
            p.put(off + 8, "I", blocks).put(off + 16, "I", root.i_u)
    return p.data()


# ---- truncation


@case("cut-in-trailing-padding", r"image is truncated")
def _() -> bytes:
    p = Patch("last-block-partial")
    return p.truncate(p.size - 100, fix_blocks=False).data()


@case("superblock-blocks-past-end", r"image is truncated")
def _() -> bytes:
    p = Patch()
    return p.put(SB + 36, "I", p.size // fmt.BLOCK_SIZE + 1).data()


# -- running a case ------------------------------------------------------------------------------


class Timeout(Exception):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def fire(_sig: int, _frame: object) -> None:
        raise Timeout(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_located(err: FormatError) -> None:
    """The error says where: an offset, or the inode/directory it is about."""
    located = err.offset is not None or re.search(
        r"\b(inode|directory) \d+|root inode", err.message
    )
    assert located or "too small" in err.message, f"unlocated error: {err}"


def check_finite(tree: Tree, image: bytes) -> None:
    names = sum(1 for _ in tree.walk())
    # every name walked is one directory entry of the image (13 bytes at least)
    assert names <= len(image) // 13 + 1
    text = dumpfile.dumps(tree)
    assert text.count(b"\n") == names
    assert len(text) < 64 * len(image)


def _params(cli: bool = False) -> list[object]:
    out = []
    for c in CASES:
        buggy = c.bug and (c.cli_shows_bug or not cli)
        marks = [pytest.mark.xfail(strict=True, reason=c.bug)] if buggy else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def test_case_ids_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", _params())
def test_reader(case: Case) -> None:
    data = case.build()
    with deadline(LOAD_SECONDS):
        started = time.perf_counter()
        if case.match is None:
            tree = load_tree(data)
            check_finite(tree, data)
        else:
            with pytest.raises(FormatError) as info:
                load_tree(data)
            assert re.search(case.match, info.value.message), info.value.message
            check_located(info.value)
        # the lazy API on the same bytes: FormatError or a result, nothing else
        exercise(data, [b"/usr/bin/sh", b"/data/small", b"/sym", b"/data/ext", b"/big"])
        assert time.perf_counter() - started < LOAD_SECONDS


@pytest.mark.parametrize("case", _params(cli=True))
def test_cli(case: Case, tmp_path: Path) -> None:
    image = tmp_path / "hostile.img"
    image.write_bytes(case.build())
    r = subprocess.run([str(INFO), "dump", str(image)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    if case.match is None:
        assert (r.returncode, r.stderr) == (0, "")
        assert r.stdout.startswith("/ ")
    else:
        assert r.returncode == 1, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith(f"composefs-info: Failed to load '{image}': "), lines[0]
        assert r.stdout == ""


def test_cycle_shapes() -> None:
    """The cycles load as the reference reads them: the first name met is the home."""
    tree = load_tree(next(c for c in CASES if c.id == "dir-cycle-to-root").build())
    assert tree.lookup(b"usr/bin/sh") is tree.root
    tree = load_tree(next(c for c in CASES if c.id == "dir-contains-itself").build())
    usr_bin = tree.lookup(b"usr/bin")
    assert usr_bin is not None and tree.lookup(b"usr/bin/sh") is usr_bin
    tree = load_tree(next(c for c in CASES if c.id == "hardlinked-directory").build())
    assert tree.lookup(b"usr") is tree.lookup(b"data/fifo")
    assert tree.lookup(b"usr/bin") is tree.lookup(b"data/fifo/bin")


def test_work_budget_is_quick_and_small() -> None:
    data = next(c for c in CASES if c.id == "2000-dirs-share-the-root-blocks").build()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(FormatError, match="overlap"):
            load_tree(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5
    assert peak < 16 * len(data) + (4 << 20), (peak, len(data))


# ---- truncation anywhere


def _cut_points(data: bytes) -> list[int]:
    """Lengths to cut a valid image to: around every structure boundary, and a grid."""
    points = set(range(0, len(data), 509))
    with Image(data) as img:
        points |= {0, 32, 1024, SB + 12, fmt.SUPERBLOCK_END - 1, img.header.xattr_offset}
        stack = [img.header.root_nid]
        seen: set[int] = set()
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            ino = img.inode(nid)
            off = img.header.meta_offset + nid * 32
            points |= {off, off + 1, off + 31, ino.tail_offset, ino.tail_offset + 1}
            if ino.is_dir():
                for chunk, length in dir_chunks(ino):
                    points |= {chunk + 8, chunk + length - 1}
                stack += [n for name, n, _t in img.iterdir(ino) if name not in (b".", b"..")]
            elif ino.i_u and ino.layout != fmt.EROFS_INODE_CHUNK_BASED and ino.size:
                points |= {ino.i_u * 4096 + ino.size % 4096 - 1}
    ordered = sorted(p for p in points if 0 <= p < len(data))
    return ordered[:: max(1, len(ordered) // 1000)]


@pytest.mark.parametrize("kind", ["compact", "extended", "demo", "special"])
def test_truncation_anywhere(kind: str) -> None:
    data = base_image(kind)
    cut_points = _cut_points(data)
    assert len(cut_points) > 100
    for n in cut_points:
        with deadline(LOAD_SECONDS):
            try:
                load_tree(data[:n])
            except FormatError as e:
                check_located(e)
            else:
                pytest.fail(f"{kind} cut to {n} of {len(data)} bytes loaded")
            exercise(data[:n], [b"/usr/bin/sh", b"/etc/motd"])


# -- seeded random mutants, in a subprocess with an address-space limit --------------------------

RLIMIT_AS = 3 << 29  # 1.5 GiB


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (RLIMIT_AS, RLIMIT_AS))


@pytest.fixture(scope="module")
def mutation_report() -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, str(MUTATOR), "--mutants", "2500", "--seeds", "1,2,3"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_memory,
    )
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report: dict[str, object] = json.loads(r.stdout)
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=1))
    return report


def _failures(report: dict[str, object], outcome: str) -> str:
    failures = report["failures"]
    assert isinstance(failures, list)
    shown = [f for f in failures if f["outcome"] == outcome][:5]
    return "\n".join(
        f"  {f['error']}\n    replay: python tests/mutate_images.py --replay {f['replay']}"
        f"  (ops {json.dumps(f['ops'])[:200]})"
        for f in shown
    )


def test_mutants_raise_only_format_error(mutation_report: dict[str, object]) -> None:
    assert mutation_report["mutants"] >= 2000
    assert mutation_report["format_error"] > 0 and mutation_report["ok"] > 0
    assert mutation_report["unexpected"] == 0, (
        f"{mutation_report['unexpected']} mutants raised something other than FormatError, "
        f"hung or used too much memory; first ones:\n" + _failures(mutation_report, "unexpected")
    )


def test_mutants_hit_no_known_reader_bug(mutation_report: dict[str, object]) -> None:
    """``KNOWN_BUGS`` in mutate_images.py: reader bugs already reported, counted apart so
    that the test above keeps finding new ones.  While it lists any, mark this test
    ``xfail(strict=True)`` with them as the reason (it is empty now: the TreeError on a bad
    i_mode and the struct.error in Image._external_xattrs were both fixed)."""
    assert not mutation_report["known"], (
        f"known reader bugs hit: {mutation_report['known']}\n" + _failures(mutation_report, "known")
    )
