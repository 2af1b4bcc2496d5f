"""mount.composefs: mount a composefs image with the kernel (EROFS + overlayfs).

Works as the helper behind ``mount -t composefs IMAGE DIR -o OPTIONS`` once it is reachable
as ``/sbin/mount.composefs``.  The options and messages are the reference tool's; see
:mod:`composefs.mount` for how the mount is made.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from composefs.cli import console_entry, fail
from composefs.mount import MountError, MountOptionsError, mount, parse_options

PROG = "mount.composefs"

USAGE = """\
usage: mount.composefs [-t composefs] [-o OPTIONS] IMAGE MOUNTPOINT
       mount -t composefs -o OPTIONS IMAGE MOUNTPOINT

Mount the composefs IMAGE at MOUNTPOINT, its files' content coming from the object
directories, e.g.:
  mount.composefs -o basedir=/var/lib/composefs/objects image.cfs /mnt/image

OPTIONS (comma-separated; a backslash escapes a comma):
  basedir=DIR[:DIR...]  object directories (required)
  digest=HEX            the image's fs-verity digest; anything else is refused
  verity                every file's object must have its recorded fs-verity digest
  tryverity             like verity, where the kernel and filesystem support fs-verity
  ro / rw               read-only mount / cancel an earlier ro
  upperdir=DIR          overlayfs upper directory for changes
  workdir=DIR           overlayfs work directory (with upperdir)
  idmap=PATH            user namespace (e.g. /proc/PID/ns/user) whose id mapping applies
  checkobjects          refuse to mount if an object the image needs is missing
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: {message}\n{USAGE}")
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog=PROG, add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-t", dest="fstype")
    parser.add_argument("-o", dest="options")
    # What mount(8) may pass to a helper: no mtab, sloppy, verbose (no-ops here), fake.
    parser.add_argument("-n", "-s", "-v", dest="ignored", action="count")
    parser.add_argument("-f", dest="fake", action="store_true")
    parser.add_argument("paths", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.help:
        sys.stderr.write(USAGE)
        return 0
    if args.fstype is not None and args.fstype != "composefs":
        return fail(PROG, f"Unsupported fs type '{args.fstype}'")
    if not args.paths:
        sys.stderr.write(f"No source path specified\n{USAGE}")
        return 1
    if len(args.paths) < 2:
        sys.stderr.write(f"No mount path specified\n{USAGE}")
        return 1
    image, mountpoint = args.paths[:2]  # like the reference, further operands are ignored
    try:
        options = parse_options(args.options)
        options.validate()
        if not args.fake:
            mount(image, mountpoint, options)
    except MountOptionsError as e:
        if e.usage:
            sys.stderr.write(f"{e}\n{USAGE}")
            return 1
        return fail(PROG, str(e))
    except MountError as e:
        return fail(PROG, str(e))
    return 0


def entry() -> None:
    console_entry(main)
