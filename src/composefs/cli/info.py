"""composefs-info: inspect composefs images and measure files (the reference's commands)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from composefs import imageinfo
from composefs.cli import console_entry, fail
from composefs.cli.args import ToolArgumentParser, UsageError, run_tool
from composefs.erofs.reader import Image
from composefs.errors import FormatError

PROG = "composefs-info"
_T = TypeVar("_T")
COMMANDS = ("ls", "dump", "objects", "missing-objects", "measure-file")


def _parser() -> ToolArgumentParser:
    p = ToolArgumentParser(
        prog=PROG,
        usage="%(prog)s [--basedir=PATH] [--filter=NAME]... COMMAND IMAGE...\n"
        "       %(prog)s measure-file FILE...",
        description="Commands: ls (list the files), dump (composefs-dump(5) text), objects "
        "(backing files the images need), missing-objects (those absent from --basedir), "
        "measure-file (fs-verity digest of files: the kernel's if enabled, else computed).",
    )
    p.add_argument("--basedir", metavar="PATH", help="object directory for missing-objects")
    p.add_argument(
        "--filter",
        metavar="NAME",
        action="append",
        default=[],
        help="only this top-level entry (repeatable)",
    )
    p.add_argument("command", nargs="?", metavar="COMMAND")
    p.add_argument("paths", nargs="*", metavar="IMAGE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(_parser(), argv, _run)


def _write(lines: Iterable[bytes]) -> None:
    out = sys.stdout.buffer
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= 4096:
            out.write(b"".join(batch))
            batch.clear()
    out.write(b"".join(batch))


def _run(a: argparse.Namespace) -> int:
    for name in a.filter:
        if "/" in name:
            return fail(PROG, f"Filter must be a single name: {name}")
    if a.command is None:
        raise UsageError("No command specified", usage=True)
    if a.command == "measure-file":
        return _measure(a.paths)
    if a.command not in COMMANDS:
        return fail(PROG, f"Unknown command '{a.command}'")
    if a.basedir is not None and not os.path.isdir(a.basedir):
        return fail(PROG, f"Can't open basedir `{a.basedir}`")
    if not a.paths:
        raise UsageError("No image path specified", usage=True)
    filters = [os.fsencode(f) for f in a.filter] or None
    # Reading an image allocates many small objects and makes no cycles: collection
    # passes would be pure cost.
    gc.disable()
    objects: set[bytes] = set()
    for path in a.paths:
        if a.command == "dump":
            # straight from the image, without a Tree when it can
            lines = _load(path, lambda image: imageinfo.dump_image(image, filters))
            if lines is None:
                return 1
            _write(lines)
            continue
        tree = _load(path, lambda image: image.to_tree(filter=filters))
        if tree is None:
            return 1
        if a.command == "ls":
            _write(imageinfo.ls_lines(tree))
        else:
            objects |= imageinfo.object_paths(tree)
    if a.command == "objects":
        _write(imageinfo.object_lines(objects))
    elif a.command == "missing-objects":
        # Without --basedir nothing can be found, so every object is missing.
        missing = objects if a.basedir is None else imageinfo.missing_objects(objects, a.basedir)
        _write(imageinfo.object_lines(missing))
    return 0


def _load(path: str, read: Callable[[Image], _T]) -> _T | None:
    """``read(image)``, or None once the error is reported."""
    try:
        with Image(path) as image:
            return read(image)
    except FormatError as e:
        fail(PROG, f"Failed to load '{path}': {e.message}")
    except OSError as e:
        fail(PROG, f"Failed to open '{path}': {e.strerror}")
    return None


def _measure(paths: list[str]) -> int:
    from composefs import fsverity  # only this command hashes

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
