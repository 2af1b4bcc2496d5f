"""Seeded mutation fuzzing of the image reader: every failure must be a FormatError.

Builds a few valid images from dumps, derives thousands of mutants from them (byte flips,
runs of random bytes, field overwrites with edge values, splices, truncations) and runs
every reader entry point on each: ``Image(...).to_tree()``, ``dumpfile.dumps`` of the
result, and the lazy API (``lookup``, ``iterdir``, ``inode``, ``raw_xattrs``, ``readlink``,
``read_data``, ``to_inode``).  The only exception allowed out of the reader is
:class:`composefs.errors.FormatError`; a hang (per-mutant alarm) or an unreasonable peak
of traced memory counts as a failure too.

Each mutant is fully determined by (image, seed, index), so a failure can be replayed::

    python tests/mutate_images.py --replay demo:1:234            # traceback of one mutant
    python tests/mutate_images.py --replay demo:1:234 --write m.img   # and save its bytes

The run prints one JSON report on stdout (counts per image and per mutation kind, the
first failures with their mutation ops) and exits 1 when an unexpected exception was
seen.  ``tests/test_hostile_images.py`` runs it in a subprocess under ``RLIMIT_AS``.
Exceptions matching ``KNOWN_BUGS`` (reader bugs already reported, see the test module)
are counted apart so that the run still catches new ones.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import signal
import struct
import sys
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
SHARED = Path(os.environ.get("COMPOSEFS_SHARED", REPO.parent / "shared"))
UPSTREAM = SHARED / "testdata" / "upstream"

from composefs import dumpfile  # noqa: E402
from composefs.erofs import format as fmt  # noqa: E402
from composefs.erofs.dumptext import dump_text  # noqa: E402
from composefs.erofs.reader import Image, ImageInode  # noqa: E402
from composefs.erofs.writer import build_image  # noqa: E402
from composefs.errors import FormatError  # noqa: E402
from composefs.imageinfo import ls_lines  # noqa: E402
from composefs.tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Tree  # noqa: E402

HANG_SECONDS = 10.0  # per mutant; a valid 1.6 MB image loads in ~0.3 s
# Traced peak allowed for one mutant: a small multiple of the image plus a constant for
# the interpreter's own allocations (valid images stay under 20x).
MEM_FACTOR = 32
MEM_SLACK = 4 << 20
MEMCHECK_MAX = 256 << 10  # tracemalloc slows loading 5x: not on the big image

# Exceptions already reported as reader bugs: (id, exception type name, message regex).
# They are counted under "known" instead of "unexpected", so that a run still finds new
# bugs past a frequent one; remove an entry once fixed.  Both bugs this found are fixed:
#   ("invalid-mode-treeerror", "TreeError", r"invalid mode"),  # 8% of all mutants
#   ("external-xattrs-struct-error", "error", r"unpack_from requires a buffer"),
KNOWN_BUGS: list[tuple[str, str, str]] = []


# -- the per-input checks (shared with fuzz/fuzz_reader.py) ---------------------------------


def _lazy_inode(img: Image, ino: ImageInode) -> None:
    ftype = ino.mode & S_IFMT
    img.raw_xattrs(ino)
    if ftype == S_IFDIR:
        for _ in islice(img.iterdir(ino), 300):
            pass
    elif ftype == S_IFLNK:
        img.readlink(ino)
    elif ftype == S_IFREG and ino.layout != fmt.EROFS_INODE_CHUNK_BASED:
        img.read_data(ino, 5000)
    img.to_inode(ino)


def tree_objects(tree: Tree) -> set[bytes]:
    """The objects a Tree's regular files keep their content in."""
    return {
        node.payload.lstrip(b"/")
        for _path, node in tree.walk()
        if node.mode & S_IFMT == S_IFREG and node.content is None and node.payload and node.size
    }


def exercise(data: bytes, paths: Sequence[bytes] = ()) -> str:
    """Every reader entry point on ``data``: "ok", or "format_error" if any raised
    FormatError.  Any other exception propagates to the caller."""
    try:
        img = Image(data)
    except FormatError:
        return "format_error"
    failed = 0

    def attempt(fn: Callable[[], object]) -> None:
        nonlocal failed
        try:
            fn()
        except FormatError:
            failed += 1

    def whole() -> None:
        # the fast dump must print what the Tree's dump prints, or fail with the same error
        try:
            fast: bytes | str = b"".join(dump_text(img))
        except FormatError as e:
            fast = e.message
        try:
            tree = img.to_tree()
        except FormatError as e:
            if fast != e.message:
                raise AssertionError(f"dump_text gave {fast[:80]!r}, to_tree {e}") from None
            raise
        if fast != dumpfile.dumps(tree):
            raise AssertionError("dump_text differs from the dump of to_tree")
        # the object walk of gc and stats finds the objects the Tree names
        walked = {obj for _ino, obj in img.regular_files()} - {None}
        if walked != tree_objects(tree):
            raise AssertionError("regular_files differ from the Tree's objects")
        for _ in ls_lines(tree):
            pass

    def root_entries() -> None:
        for _name, nid, _ftype in islice(img.iterdir(img.root), 400):
            attempt(lambda nid=nid: _lazy_inode(img, img.inode(nid)))

    def lookup(path: bytes) -> None:
        ino = img.lookup(path)
        if ino is not None:
            _lazy_inode(img, ino)

    with img:
        attempt(whole)
        attempt(lambda: _lazy_inode(img, img.root))
        attempt(root_entries)
        for path in paths:
            attempt(lambda path=path: lookup(path))
    return "format_error" if failed else "ok"


# -- base images -------------------------------------------------------------------------------


@dataclass
class Base:
    name: str
    data: bytes
    weight: float  # share of the mutants
    paths: list[bytes] = field(default_factory=list)  # lazy lookups to try
    ranges: list[tuple[int, int]] = field(default_factory=list)  # structures, [start, end)
    fields: list[tuple[int, str]] = field(default_factory=list)  # (offset, struct code)
    nids: list[int] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)


def dir_chunks(ino: ImageInode) -> Iterator[tuple[int, int]]:
    size = ino.size
    if ino.layout == fmt.EROFS_INODE_FLAT_INLINE:
        tail = size % fmt.BLOCK_SIZE
    else:
        tail = 0
    blocks = size - tail
    start = ino.i_u * fmt.BLOCK_SIZE
    for off in range(start, start + blocks, fmt.BLOCK_SIZE):
        yield off, min(fmt.BLOCK_SIZE, start + blocks - off)
    if tail:
        yield ino.tail_offset, tail


def analyse(name: str, data: bytes, weight: float) -> Base:
    """Locate the structures of a valid image through the reader's API."""
    base = Base(name, data, weight)
    base.ranges += [(0, 32), (fmt.EROFS_SUPER_OFFSET, fmt.SUPERBLOCK_END)]
    sb = fmt.EROFS_SUPER_OFFSET
    base.fields += [(4, "I"), (12, "I"), (sb, "I"), (sb + 12, "B"), (sb + 14, "H")]
    base.fields += [(sb + 16, "Q"), (sb + 36, "I"), (sb + 40, "I"), (sb + 44, "I")]
    with Image(data) as img:
        meta = img.header.meta_offset
        base.ranges.append((img.header.xattr_offset, min(len(data), img.header.xattr_offset + 512)))
        seen: set[int] = set()
        stack: list[tuple[bytes, int]] = [(b"/", img.header.root_nid)]
        while stack:
            path, nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            ino = img.inode(nid)
            base.nids.append(nid)
            if len(base.paths) < 12 or random.Random(nid).random() < 0.02:
                base.paths.append(path)
            off = meta + nid * fmt.SLOT_SIZE
            extended = ino.tail_offset - ino.xattr_size - off == fmt.INODE_EXTENDED.size
            end = ino.tail_offset
            if ino.layout == fmt.EROFS_INODE_FLAT_INLINE:
                end += ino.size % fmt.BLOCK_SIZE
            elif ino.layout == fmt.EROFS_INODE_CHUNK_BASED:
                end += 8
            base.ranges.append((off, end))
            base.boundaries += [off, off + 32, ino.tail_offset, end]
            base.fields += [(off, "H"), (off + 2, "H"), (off + 4, "H"), (off + 16, "I")]
            base.fields += [(off + 8, "Q") if extended else (off + 8, "I")]
            if not extended:
                base.fields.append((off + 6, "H"))
            if ino.xattr_offset:
                x = ino.xattr_offset
                base.fields += [(x + 4, "B"), (x + 12, "I"), (x + 12, "B"), (x + 13, "B")]
                base.fields += [(x + 14, "H")]
            if ino.is_dir():
                for coff, clen in dir_chunks(ino):
                    base.ranges.append((coff, coff + clen))
                    base.boundaries += [coff, coff + clen]
                    first = struct.unpack_from("<H", data, coff + 8)[0]
                    for rec in range(coff, coff + first, 12):
                        base.fields += [(rec, "Q"), (rec + 8, "H"), (rec + 10, "B")]
                for child_name, child, _t in img.iterdir(ino):
                    if child_name not in (b".", b"..") and child not in seen:
                        sep = b"" if path == b"/" else b"/"
                        stack.append((path + sep + child_name, child))
            elif ino.layout != fmt.EROFS_INODE_CHUNK_BASED and ino.i_u and ino.size:
                base.ranges.append((ino.i_u * 4096, ino.i_u * 4096 + 4096))
    base.boundaries = sorted(set(base.boundaries))
    return base


def _upstream(name: str) -> bytes | None:
    path = UPSTREAM / name
    if not path.exists():
        return None
    raw = path.read_bytes()
    return gzip.decompress(raw) if name.endswith(".gz") else raw


def base_images(only: str | None = None) -> list[Base]:
    from randomtree import random_dump

    specs: list[tuple[str, Callable[[], bytes | None], float]] = [
        (
            "demo",
            lambda: build_image(
                dumpfile.parse((REPO / "examples/demo.dump").read_bytes(), strict=True)
            ),
            0.33,
        ),
        ("random", lambda: build_image(dumpfile.parse(random_dump(7, 80), strict=False)), 0.2),
    ]

    def upstream(name: str, strict: bool, version: int | None) -> Callable[[], bytes | None]:
        def build() -> bytes | None:
            text = _upstream(name)
            if text is None:
                return None
            kw = {} if version is None else {"min_version": version, "max_version": version}
            return build_image(dumpfile.parse(text, strict=strict), **kw)

        return build

    specs += [
        ("special", upstream("special.dump", True, 0), 0.17),
        ("longlink", upstream("longlink.dump", False, None), 0.28),
        # 1.6 MB, 30x slower per mutant than the others: a few dozen mutants
        ("config-hard-link", upstream("config-with-hard-link.dump.gz", True, None), 0.013),
    ]
    out = []
    for name, build, weight in specs:
        if only is not None and name != only:
            continue
        data = build()
        if data is not None:
            out.append(analyse(name, data, weight))
    return out


# -- mutations -------------------------------------------------------------------------------

Op = list[object]  # ["xor", offset, hex] | ["write", offset, hex] | ["truncate", length]

_EDGE = {
    "B": [0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF],
    "H": [0, 1, 2, 11, 12, 13, 24, 255, 256, 4095, 4096, 4097, 0x7FFF, 0x8000, 0xFFFF],
    "I": [0, 1, 0xFFF, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF],
    "Q": [0, 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1],
}


def _position(rng: random.Random, base: Base) -> int:
    if rng.random() < 0.5:
        return rng.randrange(len(base.data))
    start, end = rng.choice(base.ranges)
    return rng.randrange(start, max(start + 1, end)) % len(base.data)


def _edge_value(rng: random.Random, code: str, base: Base) -> int:
    size = len(base.data)
    bits = struct.calcsize(code) * 8
    r = rng.random()
    if r < 0.5:
        return rng.choice(_EDGE[code])
    if r < 0.75 and code in "IQ":
        value = rng.choice(
            [size, size // 32, size // 4096, (size - 16) // 32, (size - 32) // 32]
            + [rng.choice(base.nids) for _ in range(4)]
        )
        return value % (1 << bits)
    if r < 0.85 and code == "H":
        return rng.choice(base.nids) % (1 << bits)
    return rng.getrandbits(bits)


def mutate(base: Base, seed: int, index: int) -> tuple[str, list[Op]]:
    """The mutation ops of mutant ``index`` of ``base`` under ``seed`` (deterministic)."""
    rng = random.Random(f"{seed}:{base.name}:{index}")
    size = len(base.data)
    kind = rng.choices(
        ["flip", "run", "field", "splice", "truncate"], weights=[30, 12, 33, 10, 15]
    )[0]
    ops: list[Op] = []
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            ops.append(["xor", _position(rng, base), f"{rng.randrange(1, 256):02x}"])
    elif kind == "run":
        length = rng.choice([rng.randint(1, 16), rng.randint(1, 64), rng.randint(64, 512)])
        fill = rng.random()
        if fill < 0.6:
            run = rng.randbytes(length)
        else:
            run = bytes([0 if fill < 0.8 else 0xFF]) * length
        ops.append(["write", _position(rng, base), run.hex()])
    elif kind == "field":
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            off, code = rng.choice(base.fields)
            value = _edge_value(rng, code, base)
            ops.append(["write", off, struct.pack("<" + code, value).hex()])
    elif kind == "splice":
        src_start, src_end = rng.choice(base.ranges)
        length = rng.randint(1, max(1, min(4096, src_end - src_start)))
        src = rng.randrange(src_start, max(src_start + 1, src_end - length + 1))
        ops.append(["write", _position(rng, base), base.data[src : src + length].hex()])
    else:
        if rng.random() < 0.5 and base.boundaries:
            length = rng.choice(base.boundaries) + rng.randint(-3, 3)
        else:
            length = rng.randrange(size)
        ops.append(["truncate", max(0, min(size - 1, length))])
    return kind, ops


def apply(data: bytes, ops: Sequence[Op]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if op[0] == "truncate":
            del buf[int(op[1]) :]  # type: ignore[call-overload]
            continue
        off = int(op[1])  # type: ignore[call-overload]
        patch = bytes.fromhex(str(op[2]))
        patch = patch[: max(0, len(buf) - off)]
        if op[0] == "xor":
            patch = bytes(a ^ b for a, b in zip(buf[off : off + len(patch)], patch, strict=True))
        buf[off : off + len(patch)] = patch
    return bytes(buf)


# -- the run -----------------------------------------------------------------------------------


class Hang(Exception):
    pass


def _on_alarm(_sig: int, _frame: FrameType | None) -> None:
    raise Hang(f"no result after {HANG_SECONDS} s")


def known_bug(exc: BaseException) -> str | None:
    for bug_id, type_name, pattern in KNOWN_BUGS:
        if type(exc).__name__ == type_name and re.search(pattern, str(exc)):
            return bug_id
    return None


def run_one(base: Base, data: bytes, memcheck: bool) -> tuple[str, str | None, int]:
    """(outcome, detail, traced peak): outcome is ok / format_error / known / unexpected."""
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    peak = 0
    try:
        if memcheck:
            tracemalloc.start()
        try:
            outcome = exercise(data, base.paths)
        finally:
            if memcheck:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
    except BaseException as e:  # classifying everything is the point
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} {tb[-1].name}" if tb else "?"
        detail = f"{type(e).__name__}: {e} [{where}]"
        known = known_bug(e)
        return ("known", f"{known}: {detail}", peak) if known else ("unexpected", detail, peak)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if memcheck and peak > MEM_FACTOR * len(data) + MEM_SLACK:
        return "unexpected", f"memory: traced peak {peak} for {len(data)} bytes", peak
    return outcome, None, peak


def run(
    bases: list[Base], total: int, seeds: Sequence[int], memcheck_every: int
) -> dict[str, object]:
    signal.signal(signal.SIGALRM, _on_alarm)
    started = time.perf_counter()
    weight = sum(b.weight for b in bases)
    counts: Counter[str] = Counter()
    per_image: dict[str, Counter[str]] = {}
    per_kind: dict[str, Counter[str]] = {}
    known: Counter[str] = Counter()
    failures: list[dict[str, object]] = []
    max_ratio = 0.0
    n = 0
    for base in bases:
        share = max(1, round(total * base.weight / weight / len(seeds)))
        image_counts = per_image.setdefault(base.name, Counter())
        for seed in seeds:
            for index in range(share):
                kind, ops = mutate(base, seed, index)
                data = apply(base.data, ops)
                memcheck = (
                    memcheck_every > 0 and n % memcheck_every == 0 and len(data) <= MEMCHECK_MAX
                )
                outcome, detail, peak = run_one(base, data, memcheck)
                n += 1
                if memcheck and data:
                    max_ratio = max(max_ratio, peak / len(data))
                counts[outcome] += 1
                image_counts[outcome] += 1
                per_kind.setdefault(kind, Counter())[outcome] += 1
                if outcome == "known":
                    assert detail is not None
                    known[detail.split(":", 1)[0]] += 1
                if outcome in ("unexpected", "known") and len(failures) < 20:
                    failures.append(
                        {
                            "outcome": outcome,
                            "replay": f"{base.name}:{seed}:{index}",
                            "kind": kind,
                            "ops": ops,
                            "error": detail,
                        }
                    )
    return {
        "mutants": n,
        "ok": counts["ok"],
        "format_error": counts["format_error"],
        "known": dict(known),
        "unexpected": counts["unexpected"],
        "per_image": {k: dict(v) for k, v in per_image.items()},
        "per_kind": {k: dict(v) for k, v in per_kind.items()},
        "images": {b.name: len(b.data) for b in bases},
        "max_traced_peak_ratio": round(max_ratio, 2),
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 2),
    }


def replay(spec: str, write: str | None) -> int:
    name, seed, index = spec.split(":")
    bases = base_images(only=name)
    if not bases:
        print(f"no base image {name!r}", file=sys.stderr)
        return 2
    base = bases[0]
    kind, ops = mutate(base, int(seed), int(index))
    data = apply(base.data, ops)
    print(json.dumps({"kind": kind, "ops": ops, "size": len(data)}))
    if write:
        Path(write).write_bytes(data)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    print(exercise(data, base.paths))  # a failure shows its traceback
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mutants", type=int, default=3000, help="total mutants (default 3000)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--only", help="one base image: demo, random, special, longlink, ...")
    p.add_argument("--memcheck-every", type=int, default=30, help="tracemalloc every Nth mutant")
    p.add_argument("--replay", metavar="IMAGE:SEED:INDEX", help="run one mutant, show traceback")
    p.add_argument("--write", metavar="PATH", help="with --replay: save the mutant's bytes")
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.write)
    seeds = [int(s) for s in args.seeds.split(",")]
    report = run(base_images(args.only), args.mutants, seeds, args.memcheck_every)
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
