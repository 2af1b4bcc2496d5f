"""mount.composefs: mount a composefs image with the kernel (EROFS + overlayfs).

Works as the helper behind ``mount -t composefs IMAGE DIR -o OPTIONS`` once it is reachable
as ``/sbin/mount.composefs``.  The options and messages are the reference tool's; see
:mod:`composefs.mount` for how the mount is made.
"""

from __future__ import annotations

import getopt
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


def main(argv: Sequence[str] | None = None) -> int:
    # getopt, as the reference: options may follow the operands, as mount(8) passes them.
    # -n (no mtab), -s (sloppy) and -v (verbose), which mount(8) may add, change nothing;
    # -f (fake) does everything but the mount.
    try:
        opts, paths = getopt.gnu_getopt(list(sys.argv[1:] if argv is None else argv), "ht:o:nsvf")
    except getopt.GetoptError as e:
        sys.stderr.write(f"{PROG}: {e.msg}\n{USAGE}")
        return 1
    fstype = options_text = None
    fake = False
    for flag, value in opts:
        if flag == "-h":
            sys.stderr.write(USAGE)
            return 0
        if flag == "-t":
            fstype = value
        elif flag == "-o":
            options_text = value
        elif flag == "-f":
            fake = True
    if fstype is not None and fstype != "composefs":
        return fail(PROG, f"Unsupported fs type '{fstype}'")
    if not paths:
        sys.stderr.write(f"No source path specified\n{USAGE}")
        return 1
    if len(paths) < 2:
        sys.stderr.write(f"No mount path specified\n{USAGE}")
        return 1
    image, mountpoint = paths[:2]  # like the reference, further operands are ignored
    try:
        options = parse_options(options_text)
        options.validate()
        if not fake:
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
