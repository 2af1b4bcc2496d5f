"""composefs-info: inspect composefs images and measure files (the reference's commands)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from composefs import fsverity
from composefs.cli import ToolArgumentParser, UsageError, console_entry, fail

PROG = "composefs-info"
IMAGE_COMMANDS = ("ls", "dump", "objects", "missing-objects")


def _parser() -> ToolArgumentParser:
    p = ToolArgumentParser(
        prog=PROG,
        usage="%(prog)s [--basedir=PATH] [--filter=NAME]... COMMAND IMAGE...\n"
        "       %(prog)s measure-file FILE...",
        description="Commands: measure-file prints the fs-verity digest of each FILE "
        "(the kernel's if the file has fs-verity, else computed).",
    )
    p.add_argument("--basedir", metavar="PATH", help="object directory for missing-objects")
    p.add_argument(
        "--filter", metavar="NAME", action="append", default=[], help="only this top-level entry"
    )
    p.add_argument("command", nargs="?", metavar="COMMAND")
    p.add_argument("paths", nargs="*", metavar="FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        if e.usage:
            parser.print_usage(sys.stderr)
        return 1


def _run(a: argparse.Namespace) -> int:
    if a.command is None:
        raise UsageError("No command specified", usage=True)
    if a.command == "measure-file":
        return _measure(a.paths)
    if a.command in IMAGE_COMMANDS:
        return fail(PROG, f"'{a.command}' is not available yet in this version")
    raise UsageError(f"Unknown command '{a.command}'", usage=True)


def _measure(paths: list[str]) -> int:
    if not paths:
        raise UsageError("No files specified", usage=True)
    out = sys.stdout
    for path in paths:
        try:
            digest = fsverity.measure_file(path)
        except FileNotFoundError:
            return fail(PROG, f"Failed to open '{path}'")
        except OSError as e:
            return fail(PROG, f"failed to measure '{path}': {e.strerror}")
        out.write(digest.hex() + "\n")
    return 0


def entry() -> None:
    console_entry(main)


if __name__ == "__main__":
    entry()
