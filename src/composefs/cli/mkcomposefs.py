"""mkcomposefs: build a composefs image (drop-in for the reference tool's options)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence

from composefs import dumpfile
from composefs.cli import console_entry, fail
from composefs.cli.args import ToolArgumentParser, UsageError, run_tool
from composefs.erofs.writer import build_image
from composefs.errors import DumpfileError, TreeError
from composefs.fsutil import write_atomic

PROG = "mkcomposefs"
DEFAULT_MIN_VERSION = 0
DEFAULT_MAX_VERSION = 1


def _parser() -> ToolArgumentParser:
    p = ToolArgumentParser(
        prog=PROG,
        usage="%(prog)s [OPTIONS] SOURCE IMAGE\n"
        "       %(prog)s [OPTIONS] --print-digest-only SOURCE",
        description="Build a composefs image from a directory or (with --from-file) a "
        "composefs-dump(5) file.  IMAGE '-' writes to standard output.",
        epilog="Set CFS_PARSE_STRICT in the environment for strict dump parsing.",
    )
    p.add_argument("--from-file", action="store_true", help="SOURCE is a dump file ('-' = stdin)")
    p.add_argument(
        "--digest-store", metavar="PATH", help="copy file contents into this object store"
    )
    p.add_argument("--print-digest", action="store_true", help="print the image's fs-verity digest")
    p.add_argument(
        "--print-digest-only",
        action="store_true",
        help="print the image's fs-verity digest and write no image",
    )
    p.add_argument("--use-epoch", action="store_true", help="set every mtime to 0")
    p.add_argument("--skip-devices", action="store_true", help="leave out device nodes")
    p.add_argument("--skip-xattrs", action="store_true", help="store no xattrs")
    p.add_argument("--user-xattrs", action="store_true", help="store only user.* xattrs")
    p.add_argument(
        "--min-version", metavar="N", help=f"base format version (default {DEFAULT_MIN_VERSION})"
    )
    p.add_argument(
        "--max-version", metavar="N", help=f"highest format version (default {DEFAULT_MAX_VERSION})"
    )
    p.add_argument("--threads", metavar="N", help="worker processes for hashing (default: CPUs)")
    p.add_argument(
        "--hardlinks",
        action="store_true",
        help="keep hardlinks as hardlinks (the reference 1.0.8 stores each name apart)",
    )
    p.add_argument("paths", nargs="*", metavar="SOURCE [IMAGE]")
    return p


def _version(value: str | None, which: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise UsageError(f"Invalid {which} version {value}")
    return int(value)


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(_parser(), argv, _run)


def _run(a: argparse.Namespace) -> int:
    paths: list[str] = a.paths
    if not paths:
        raise UsageError("No source path specified", usage=True)
    if len(paths) > 2:
        raise UsageError("Too many arguments", usage=True)
    source = paths[0]
    if not source:
        raise UsageError("Empty source path specified")
    digest_only: bool = a.print_digest_only
    image_path = paths[1] if len(paths) > 1 else None
    if digest_only and image_path is not None:
        raise UsageError("Cannot specify destination path with --print-digest-only")
    if not digest_only and image_path is None:
        raise UsageError("No destination path specified", usage=True)
    min_v = _version(a.min_version, "min")
    max_v = _version(a.max_version, "max")
    if min_v is None and max_v is None:
        min_v, max_v = DEFAULT_MIN_VERSION, DEFAULT_MAX_VERSION
    else:
        # As in the reference: giving either one makes the other default to 0.
        min_v = min_v or 0
        max_v = max_v or 0
    threads = a.threads
    if threads is not None and (not threads.lstrip("-").isdigit() or int(threads) <= 0):
        raise UsageError(f"Invalid threads count {threads}")
    if a.skip_xattrs and a.user_xattrs:
        return fail(PROG, "--skip-xattrs and --user-xattrs cannot be combined")
    if image_path == "-" and sys.stdout.isatty():
        return fail(PROG, "stdout is a tty.  Refusing to use it")
    # Building allocates many small objects and frees none: collection passes are pure cost.
    gc.disable()
    if not a.from_file:
        return _from_directory(a, source, image_path, min_v, max_v, digest_only)
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
            name = "<stdin>"
        else:
            with open(source, "rb") as f:
                data = f.read()
            name = source
        tree = dumpfile.parse(data, source=name)
        image = build_image(tree, min_version=min_v, max_version=max_v)
    except OSError as e:
        return fail(PROG, f"cannot read '{source}': {e.strerror}")
    except DumpfileError as e:
        return fail(PROG, str(e))
    except TreeError as e:
        # Found while writing, as in the reference; say which line defined the file.
        line = dumpfile.line_of(data, e.path) if e.path is not None else None
        where = f"{name}:{line}: " if line is not None else ""
        return fail(PROG, f"{where}cannot write file: {e.describe()}")
    return _output(image, image_path, a.print_digest or digest_only, digest_only)


def _from_directory(
    a: argparse.Namespace,
    source: str,
    image_path: str | None,
    min_v: int,
    max_v: int,
    digest_only: bool,
) -> int:
    from composefs.objects import ObjectStore
    from composefs.progress import Progress
    from composefs.scan import ScanError, ScanOptions, ScanStats, scan_directory

    threads = int(a.threads) if a.threads is not None else len(os.sched_getaffinity(0))
    options = ScanOptions(
        use_epoch=a.use_epoch,
        skip_devices=a.skip_devices,
        skip_xattrs=a.skip_xattrs,
        user_xattrs=a.user_xattrs,
        hardlinks=a.hardlinks,
        threads=threads,
    )
    try:
        store = ObjectStore(a.digest_store) if a.digest_store else None
    except OSError as e:
        return fail(PROG, f"cannot fill store: {e.strerror}")
    bar = Progress("hashing" if store is None else "hashing and storing")

    def progress(stats: ScanStats) -> None:
        bar.update(stats.hashed_files, stats.to_hash, stats.hashed_bytes, stats.bytes)

    try:
        try:
            tree = scan_directory(source, options, store, progress=progress)
        finally:
            bar.done()
        image = build_image(tree, min_version=min_v, max_version=max_v)
    except ScanError as e:
        return fail(PROG, str(e))
    except TreeError as e:
        return fail(PROG, f"cannot write file: {e.describe()}")
    except OSError as e:
        return fail(PROG, f"cannot fill store: {e.strerror}")
    return _output(image, image_path, a.print_digest or digest_only, digest_only)


def _output(image: bytes, image_path: str | None, print_digest: bool, digest_only: bool) -> int:
    """Write the image (atomically, or to stdout) and print its digest when asked."""
    digest_line = b""
    if print_digest:
        # Imported here: hashlib and the rest are start-up time that plain runs skip.
        from composefs import fsverity

        digest_line = (fsverity.digest(image).hex() + "\n").encode()
    if digest_only:
        sys.stdout.buffer.write(digest_line)
        sys.stdout.flush()
        return 0
    assert image_path is not None
    try:
        if image_path == "-":
            out = sys.stdout.buffer
            out.write(image)
            out.write(digest_line)
            out.flush()
            return 0
        write_atomic(image_path, [image])
    except OSError as e:
        return fail(PROG, f"cannot write '{image_path}': {e.strerror}")
    if digest_line:
        sys.stdout.buffer.write(digest_line)
        sys.stdout.flush()
    return 0


def entry() -> None:
    console_entry(main)


if __name__ == "__main__":
    entry()
