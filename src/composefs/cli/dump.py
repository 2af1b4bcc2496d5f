"""composefs-dump: read an image and write it again (proves an image is reproducible)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from composefs.cli import console_entry, fail
from composefs.cli.args import ToolArgumentParser, UsageError
from composefs.erofs.reader import Image
from composefs.erofs.writer import build_image
from composefs.errors import FormatError, TreeError
from composefs.fsutil import write_atomic

PROG = "composefs-dump"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ToolArgumentParser(
        prog=PROG,
        usage="%(prog)s SRC DEST",
        description="Load the composefs image SRC and write it again to DEST, with the "
        "format version recorded in SRC.  For a valid image DEST is identical to SRC.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH")
    args = parser.parse_intermixed_args(argv)
    try:
        if not args.paths:
            raise UsageError("No source path specified", usage=True)
        if len(args.paths) < 2:
            raise UsageError("No destination path specified", usage=True)
        if len(args.paths) > 2:
            raise UsageError("Too many arguments", usage=True)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        parser.print_usage(sys.stderr)
        return 1
    src, dest = args.paths
    try:
        with Image(src) as image:
            version = image.header.composefs_version
            tree = image.to_tree()
    except FormatError as e:
        return fail(PROG, f"Failed to load '{src}': {e.message}")
    except OSError as e:
        return fail(PROG, f"Failed to open '{src}': {e.strerror}")
    try:
        data = build_image(tree, min_version=version, max_version=version)
    except TreeError as e:
        return fail(PROG, f"cannot write file: {e.describe()}")
    try:
        write_atomic(dest, [data])
    except OSError as e:
        return fail(PROG, f"failed to open '{dest}': {e.strerror}")
    return 0


def entry() -> None:
    console_entry(main)


if __name__ == "__main__":
    entry()
