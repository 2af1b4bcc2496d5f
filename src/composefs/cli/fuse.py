"""composefs-fuse: serve a composefs image over FUSE, checking content as it is read.

    composefs-fuse [-f] [-d] [-s] -o source=IMAGE,basedir=DIR[:DIR...][,OPTIONS] MOUNTPOINT
    composefs-fuse --rootless [...] MOUNTPOINT [-- COMMAND [ARG...]]

Works as root and as an ordinary user (through fusermount3).  Runs in the background
once mounted unless ``-f`` or ``-d``; unmount with ``umount`` or ``fusermount3 -u``.
``--rootless`` serves only the metadata and stacks overlayfs on it in a user namespace,
so that the kernel reads file content itself (see :mod:`composefs.rootless`).
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
       composefs-fuse --rootless [-f] [-d] [-s] [-r] [--userns|--no-userns]
                      -o source=IMAGE,basedir=DIR[,OPTIONS] MOUNTPOINT [-- COMMAND [ARG...]]

Serve the composefs IMAGE at MOUNTPOINT, file content from the object directory DIR,
every byte checked against the fs-verity digests the image records.

  -f                 stay in the foreground
  -d                 debug: log every request (implies -f)
  -s                 one thread
  -h, --help         this help;  -V, --version  the version

  --rootless         serve only the metadata and stack overlayfs on it, in new user and
                     mount namespaces (none needed as root), so that the kernel reads
                     file content straight from the objects: native speed, one page
                     cache with every mount of the objects.  With COMMAND: run it there
                     and exit with its status.  Without: keep the namespaces (in the
                     background, printing the PID to join with
                     'nsenter -t PID -U -m --preserve-credentials'; -f: in the
                     foreground) until SIGTERM.  Without fs-verity each object is checked
                     once, before the kernel may read it
  -r, --map-root-user  (--rootless) be root in the user namespace, as with unshare -r
  --userns, --no-userns  (--rootless) make a user namespace or not (default: not as root)

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
 with --rootless (not allow_other, auto_unmount):
  verity             overlayfs checks every object read against the image's fs-verity
                     digests (verity=require); refused where fs-verity is not available
  tryverity          the same where fs-verity is available
  digest=HEX         the image's own fs-verity digest, checked before mounting
  checkobjects       refuse to mount when an object is missing
  foreign_objects    accept objects that others than you and root could change (without
                     fs-verity they are checked once only)
"""

_ALWAYS = {"ro", "default_permissions", "nosuid", "nodev", "noatime"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in args:
        at = args.index("--")
        args, command = args[:at], args[at + 1 :]
    try:
        opts, paths = getopt.gnu_getopt(
            args, "hVfdsro:",
            ["help", "version", "rootless", "map-root-user", "userns", "no-userns"],
        )  # fmt: skip
    except getopt.GetoptError as e:
        sys.stderr.write(f"{PROG}: {e.msg}\n{USAGE}")
        return 1
    foreground = debug = single = rootless = map_root = False
    userns: bool | None = None
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
        elif flag == "--rootless":
            rootless = True
        elif flag in ("-r", "--map-root-user"):
            map_root = True
        elif flag in ("--userns", "--no-userns"):
            userns = flag == "--userns"
        elif flag == "-o":
            items += [i for i in value.split(",") if i]
    values: dict[str, str] = {}
    switches: set[str] = set()
    for item in items:
        key, eq, value = item.partition("=")
        if key in ("source", "basedir", "threads", "digest") and eq:
            values[key] = value
        elif key in (
            "noverify", "nopassthrough", "noacl", "allow_other", "auto_unmount", "verity",
            "tryverity", "checkobjects", "foreign_objects",
        ):  # fmt: skip
            switches.add(key)
        elif key not in _ALWAYS:
            return fail(PROG, f"unknown option '{item}'")
    if not rootless:
        needs = sorted({"verity", "tryverity", "checkobjects", "foreign_objects"} & switches)
        needs += ["digest"] if "digest" in values else []
        needs += ["-r"] if map_root else []
        needs += ["--userns"] if userns is not None else []
        needs += ["-- COMMAND"] if command is not None else []
        if needs:
            return fail(PROG, f"'{needs[0]}' needs --rootless")
    else:
        for key in ("allow_other", "auto_unmount"):
            if key in switches:
                return fail(PROG, f"'{key}' does not apply with --rootless")
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

    if rootless:
        return _rootless(
            values, switches, paths[0], command, foreground=foreground, debug=debug,
            threads=threads, userns=userns, map_root=map_root,
        )  # fmt: skip

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


def _rootless(
    values: dict[str, str],
    switches: set[str],
    mountpoint: str,
    command: list[str] | None,
    *,
    foreground: bool,
    debug: bool,
    threads: int,
    userns: bool | None,
    map_root: bool,
) -> int:
    from composefs import rootless
    from composefs.mount import MountError, MountOptions

    if command is not None and not command:
        return fail(PROG, "no command after '--'")
    options = MountOptions(
        basedirs=tuple(values["basedir"].split(":")), digest=values.get("digest"),
        verity="verity" in switches, try_verity="tryverity" in switches,
        check_objects="checkobjects" in switches,
    )  # fmt: skip
    # With a command, or in the foreground, this process serves; else a child does.
    in_process = command is not None or foreground
    _setup_logging(debug, in_process)

    def mounted(ns_pid: int, _checks: str) -> None:
        if command is None and ns_pid:
            sys.stdout.write(f"{ns_pid}\n")
            sys.stdout.flush()

    try:
        if in_process:
            return rootless.run(
                values["source"], mountpoint, options, command=command, userns=userns,
                map_root=map_root, verify="noverify" not in switches,
                foreign_objects="foreign_objects" in switches, acl="noacl" not in switches,
                threads=threads, debug=debug, on_mounted=mounted,
            )  # fmt: skip
        stack = rootless.start(
            values["source"], mountpoint, options, userns=userns, map_root=map_root,
            verify="noverify" not in switches, foreign_objects="foreign_objects" in switches,
            acl="noacl" not in switches, threads=threads, debug=debug, detach=True,
        )  # fmt: skip
    except MountError as e:
        return fail(PROG, str(e))
    if stack.private:
        mounted(stack.ns_pid, stack.checks)
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
