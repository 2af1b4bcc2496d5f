"""Command-line parsing shared by the tools that use argparse."""

from __future__ import annotations

import argparse
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
    *,
    intermixed: bool = True,
) -> int:
    """Parse (options may follow operands, as with getopt) and run; usage errors exit 1.

    Parsers with subcommands cannot be parsed intermixed; each subcommand's own options
    may still follow its operands.
    """
    args = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        if e.usage:
            parser.print_usage(sys.stderr)
        return 1
