"""composefs-fuse: serve a composefs image over FUSE, checking content as it is read.

    composefs-fuse [-f] [-d] [-s] -o source=IMAGE,basedir=DIR[:DIR...][,OPTIONS] MOUNTPOINT

Works as root and as an ordinary user (through fusermount3).  Runs in the background
once mounted unless ``-f`` or ``-d``; unmount with ``umount`` or ``fusermount3 -u``.
"""

from __future__ import annotations

import getopt
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence

from composefs.cli import console_entry, fail
from composefs.errors import FormatError

PROG = "composefs-fuse"

USAGE = """\
usage: composefs-fuse [-f] [-d] [-s] -o source=IMAGE,basedir=DIR[,OPTIONS] MOUNTPOINT

Serve the composefs IMAGE at MOUNTPOINT, file content from the object directory DIR,
every byte checked against the fs-verity digests the image records.

  -f                 stay in the foreground
  -d                 debug: log every request (implies -f)
  -s                 one thread
  -h, --help         this help;  -V, --version  the version

OPTIONS (-o, comma-separated, may be repeated):
  source=IMAGE       the image (required)
  basedir=DIR[:DIR]  object directories (required)
  noverify           serve object content unchecked
  nopassthrough      never let the kernel read objects directly
  noacl              no POSIX ACLs even if the image has them
  allow_other        let other users in (for ordinary users: user_allow_other in
                     /etc/fuse.conf)
  auto_unmount       unmount when the server ends, however it ends
  threads=N          request threads (default 4)
  ro, default_permissions, nosuid, nodev: accepted; always in effect
"""

_ALWAYS = {"ro", "default_permissions", "nosuid", "nodev", "noatime"}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts, paths = getopt.gnu_getopt(
            list(sys.argv[1:] if argv is None else argv), "hVfdso:", ["help", "version"]
        )
    except getopt.GetoptError as e:
        sys.stderr.write(f"{PROG}: {e.msg}\n{USAGE}")
        return 1
    foreground = debug = single = False
    items: list[str] = []
    for flag, value in opts:
        if flag in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if flag in ("-V", "--version"):
            from importlib.metadata import version

            sys.stdout.write(f"composefs-fuse (composefs-py) {version('composefs')}\n")
            return 0
        if flag == "-f":
            foreground = True
        elif flag == "-d":
            debug = foreground = True
        elif flag == "-s":
            single = True
        elif flag == "-o":
            items += [i for i in value.split(",") if i]
    values: dict[str, str] = {}
    switches: set[str] = set()
    for item in items:
        key, eq, value = item.partition("=")
        if key in ("source", "basedir", "threads") and eq:
            values[key] = value
        elif key in ("noverify", "nopassthrough", "noacl", "allow_other", "auto_unmount"):
            switches.add(key)
        elif key not in _ALWAYS:
            return fail(PROG, f"unknown option '{item}'")
    if len(paths) != 1:
        sys.stderr.write(
            f"{PROG}: {'no mount point given' if not paths else 'too many arguments'}\n"
        )
        sys.stderr.write(USAGE)
        return 1
    if "source" not in values:
        return fail(PROG, "No source path specified (-o source=IMAGE)")
    if "basedir" not in values:
        return fail(PROG, "No basedir specified (-o basedir=DIR)")
    try:
        threads = 1 if single else int(values.get("threads", "4"))
        if threads < 1:
            raise ValueError
    except ValueError:
        return fail(PROG, f"invalid threads count {values.get('threads')}")
    basedirs = values["basedir"].split(":")
    for d in basedirs:
        try:  # opened as the server will open it, to name the one at fault
            os.close(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as e:
            return fail(PROG, f"Failed to open basedir {d}: {e.strerror}")

    from composefs.fuse import Filesystem, FuseError, FuseOptions, load_image, serve

    _setup_logging(debug, foreground)
    options = FuseOptions(
        verify="noverify" not in switches,
        acl="noacl" not in switches,
        passthrough="nopassthrough" not in switches,
    )
    try:
        fs = Filesystem(load_image(values["source"]), basedirs, options)
    except FormatError as e:
        return fail(PROG, f"Failed to load {values['source']}: {e.message}")
    except OSError as e:
        return fail(PROG, f"Failed to open {values['source']}: {e.strerror}")
    try:
        serve(
            fs, paths[0], allow_other="allow_other" in switches,
            auto_unmount="auto_unmount" in switches, threads=threads, debug=debug,
            daemonize=not foreground,
        )  # fmt: skip
    except FuseError as e:
        return fail(PROG, str(e))
    except OSError as e:
        return fail(PROG, f"{paths[0]}: {e.strerror}")
    return 0


def _setup_logging(debug: bool, foreground: bool) -> None:
    logger = logging.getLogger("composefs.fuse")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter(f"{PROG}[%(process)d]: %(message)s"))
    logger.addHandler(handler)


def entry() -> None:
    console_entry(main)
