"""Command-line tools: argument parsing and error reporting only; the work is in the API.

Each tool is one module with a ``main(argv=None) -> int``.  Errors are one line on stderr,
``PROGRAM: MESSAGE``, and a non-zero exit status; usage mistakes print the usage too and
exit with status 1, like the reference tools.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class UsageError(Exception):
    """Bad command line: printed without the program prefix (like the reference), exit 1."""

    def __init__(self, message: str, *, usage: bool = False):
        super().__init__(message)
        self.usage = usage


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse with the reference tools' conventions: usage errors exit with status 1."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: {message}\n")


def run_tool(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace], int],
) -> int:
    """Parse (options may follow operands, as with getopt) and run; usage errors exit 1."""
    args = parser.parse_intermixed_args(argv)
    try:
        return run(args)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        if e.usage:
            parser.print_usage(sys.stderr)
        return 1


def fail(prog: str, message: str, status: int = 1) -> int:
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    return status


def show_path(path: bytes | str) -> str:
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return path


def console_entry(main: Callable[[], int]) -> NoReturn:
    """Run a tool's ``main`` as a process: flush, then exit without tearing down the heap.

    Freeing a tree of tens of thousands of objects one by one at interpreter exit costs a
    noticeable share of a run; the kernel reclaims the memory at once.
    """
    try:
        status = main()
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        status = status or 1
    os._exit(status)
