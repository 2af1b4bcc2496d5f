"""Command-line tools: argument parsing and error reporting only; the work is in the API.

Each tool is one module with a ``main(argv=None) -> int``.  Errors are one line on stderr,
``PROGRAM: MESSAGE``, and a non-zero exit status; usage mistakes print the usage too and
exit with status 1, like the reference tools.  The argparse-based helpers live in
:mod:`composefs.cli.args`, apart, so that tools run at every mount (``mount.composefs``)
do not pay for importing argparse.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


def fail(prog: str, message: str, status: int = 1) -> int:
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    return status


def print_json(value: object) -> None:
    """Machine-readable output (``--json``): indented, one trailing newline."""
    import json

    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


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
