"""cfsctl: manage a composefs repository (modelled on composefs-rs's command of that name).

Every subcommand is a call on :class:`composefs.repository.Repository`; this module only
parses, prints and maps errors to one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from composefs.cli import console_entry, fail, print_json
from composefs.cli.args import ToolArgumentParser, UsageError, run_tool
from composefs.errors import ComposefsError
from composefs.progress import human_size as _size

PROG = "cfsctl"


def _parser() -> ToolArgumentParser:
    p = ToolArgumentParser(
        prog=PROG,
        description="Manage a composefs repository: one object store shared by all its images.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--repo", metavar="PATH", help="the repository at PATH")
    where.add_argument(
        "--user", action="store_true", help="the user's repository, ~/.var/lib/composefs"
    )
    where.add_argument(
        "--system", action="store_true", help="the system repository, /sysroot/composefs"
    )
    p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ToolArgumentParser)

    s = sub.add_parser("init", help="create a repository (or confirm one exists)")
    s.add_argument("path", nargs="?", help="where (default: --repo/--user/--system)")
    s.add_argument(
        "--algorithm", default="fsverity-sha256-12", help="digest algorithm (only the default)"
    )
    s.add_argument("--insecure", action="store_true", help="do not use fs-verity")
    s.add_argument(
        "--require-verity", action="store_true", help="fail where fs-verity is unavailable"
    )

    s = sub.add_parser("import", help="store an image (and its objects); prints the image id")
    s.add_argument("source", help="a directory, or with --dump/--image a file")
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--dump", action="store_true", help="SOURCE is a composefs-dump(5) file")
    kind.add_argument("--image", action="store_true", help="SOURCE is a composefs image")
    s.add_argument(
        "--objects", metavar="DIR", help="object directory the dump's or image's files come from"
    )
    s.add_argument("--ref", metavar="NAME", help="name the image (a gc root)")
    s.add_argument("--use-epoch", action="store_true", help="all mtimes 0 (directories)")
    s.add_argument("--skip-devices", action="store_true", help="leave device files out")
    s.add_argument("--skip-xattrs", action="store_true", help="leave xattrs out")
    s.add_argument("--user-xattrs", action="store_true", help="keep only user.* xattrs")
    s.add_argument("--hardlinks", action="store_true", help="keep hardlinks as one inode")
    s.add_argument("--threads", type=int, metavar="N", help="hashing processes (default: CPUs)")
    s.add_argument("--json", action="store_true", help="print what was done as JSON")

    s = sub.add_parser("images", help="list the images: ids, refs, sizes")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("ref", help="add, remove or list refs")
    refs = s.add_subparsers(
        dest="ref_command", metavar="add|rm|ls", parser_class=ToolArgumentParser
    )
    r = refs.add_parser("add", help="point NAME at an image (id or ref)")
    r.add_argument("name")
    r.add_argument("target")
    r = refs.add_parser("rm", help="remove refs")
    r.add_argument("names", nargs="+")
    r = refs.add_parser("ls", help="list refs")
    r.add_argument("--json", action="store_true")

    s = sub.add_parser("mount", help="mount an image by ref or id (verified first)")
    s.add_argument("name", help="a ref name or an image id")
    s.add_argument("mountpoint")
    s.add_argument("--fuse", action="store_true", help="serve it with FUSE (no root needed)")
    s.add_argument(
        "-f", "--foreground", action="store_true", help="with --fuse: serve in this process"
    )

    s = sub.add_parser("gc", help="remove what no ref reaches")
    s.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("fsck", help="check objects, images and refs")
    s.add_argument("--json", action="store_true")
    s.add_argument("--repair", action="store_true", help="move damaged objects aside")

    s = sub.add_parser("stats", help="space used, shared and saved, per image and in total")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("oci", help="OCI images: pull, images, inspect, mount, rm")
    oci = s.add_subparsers(
        dest="oci_command", metavar="pull|images|inspect|mount|rm", parser_class=ToolArgumentParser
    )
    o = oci.add_parser("pull", help="pull an image into the repository")
    o.add_argument("source", help="docker://HOST/REPO:TAG, oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                   "docker-archive:FILE[:REPO:TAG]")  # fmt: skip
    o.add_argument("name", nargs="?", help="the OCI ref to give it (default: SOURCE)")
    o.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this machine's")
    o.add_argument(
        "--creds", metavar="USER[:PASSWORD]",
        help="registry credentials (default: those podman/skopeo/docker login saved)",
    )  # fmt: skip
    o.add_argument(
        "--authfile", metavar="PATH",
        help="read credentials from this containers-auth.json(5) file only",
    )  # fmt: skip
    o.add_argument(
        "--tls-verify", default="true", choices=("true", "false"),
        help="false: accept any certificate, or plain http (local registries)",
    )  # fmt: skip
    o.add_argument("--json", action="store_true", help="print what was done as JSON")
    o = oci.add_parser("images", help="list the OCI images")
    o.add_argument("--json", action="store_true")
    o = oci.add_parser("inspect", help="an OCI image's record, manifest or config")
    o.add_argument("name")
    which = o.add_mutually_exclusive_group()
    which.add_argument("--manifest", action="store_true", help="the manifest, as pulled")
    which.add_argument("--config", action="store_true", help="the config, as pulled")
    o = oci.add_parser("mount", help="mount an OCI image's composefs image")
    o.add_argument("name")
    o.add_argument("mountpoint")
    o.add_argument("--fuse", action="store_true", help="serve it with FUSE (no root needed)")
    o.add_argument("-f", "--foreground", action="store_true", help="with --fuse: stay")
    o = oci.add_parser("rm", help="remove OCI refs (gc then frees what they alone used)")
    o.add_argument("names", nargs="+")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(_parser(), argv, _run, intermixed=False)


def _repo_path(a: argparse.Namespace) -> Path:
    from composefs import repository

    if a.repo:
        return Path(a.repo)
    if a.system:
        return repository.system_path()
    if a.user:
        return repository.user_path()
    return repository.default_path()


def _run(a: argparse.Namespace) -> int:
    if a.version:
        from importlib.metadata import version

        sys.stdout.write(f"cfsctl (composefs-py) {version('composefs')}\n")
        return 0
    if a.command is None:
        raise UsageError(f"{PROG}: no command given", usage=True)
    if a.command == "ref" and a.ref_command is None:
        raise UsageError(f"{PROG}: ref: say add, rm or ls", usage=True)
    if a.command == "oci" and a.oci_command is None:
        raise UsageError(f"{PROG}: oci: say pull, images, inspect, mount or rm", usage=True)
    from composefs.repository import Repository, RepositoryError

    try:
        if a.command == "init":
            return _init(a)
        repo = Repository(_repo_path(a))
        return int(COMMANDS[a.command](repo, a))
    except RepositoryError as e:
        return fail(PROG, str(e))
    except ComposefsError as e:
        return fail(PROG, str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return fail(PROG, f"{where}{e.strerror or e}")


def _init(a: argparse.Namespace) -> int:
    from composefs.repository import ALGORITHM, Repository

    if a.algorithm != ALGORITHM:
        return fail(PROG, f"unsupported algorithm '{a.algorithm}' (only {ALGORITHM})")
    path = Path(a.path) if a.path else _repo_path(a)
    repo, created = Repository.init(path, insecure=a.insecure, require_verity=a.require_verity)
    if not created:
        print(f"Repository already initialized at {path}")
        return 0
    print(f"Initialized composefs repository at {path}")
    print(f"  algorithm: {ALGORITHM}")
    if repo.secure:
        print("  verity:    required")
    elif a.insecure:
        print("  verity:    not required (insecure)")
    else:
        print("  verity:    not available on this filesystem (insecure)")
    return 0


def _import(repo: Any, a: argparse.Namespace) -> int:
    gc.disable()  # building allocates many objects and frees none
    try:
        return _import_unmanaged(repo, a)
    finally:
        gc.enable()  # main() may run inside a longer-lived process


def _import_unmanaged(repo: Any, a: argparse.Namespace) -> int:
    from composefs.progress import Progress

    if a.objects and not (a.dump or a.image):
        raise UsageError(f"{PROG}: --objects goes with --dump or --image")
    bar = Progress("importing")
    try:
        if a.dump or a.image:
            tree = _load_tree(a.source, a.image)

            def progress(done: int, total: int) -> None:
                bar.update(done, total, 0, 0)

            result = repo.import_tree(
                tree, ref=a.ref, objects_from=a.objects, source=a.source, progress=progress
            )
        else:
            from composefs.scan import ScanError, ScanOptions, ScanStats

            if a.skip_xattrs and a.user_xattrs:
                return fail(PROG, "--skip-xattrs and --user-xattrs cannot be combined")
            threads = a.threads or len(os.sched_getaffinity(0))
            if threads < 1:
                raise UsageError(f"Invalid threads count {a.threads}")
            options = ScanOptions(
                use_epoch=a.use_epoch,
                skip_devices=a.skip_devices,
                skip_xattrs=a.skip_xattrs,
                user_xattrs=a.user_xattrs,
                hardlinks=a.hardlinks,
                threads=threads,
            )

            def scan_progress(s: ScanStats) -> None:
                bar.update(s.hashed_files, s.to_hash, s.hashed_bytes, s.bytes)

            try:
                result = repo.import_directory(
                    a.source, ref=a.ref, options=options, progress=scan_progress
                )
            except ScanError as e:
                return fail(PROG, str(e))
    finally:
        bar.done()
    if a.ref is None and result.image_id not in repo.refs().values():
        # as in composefs-rs, an image nothing names is garbage: say so before gc proves it
        sys.stderr.write(
            f"{PROG}: note: no ref names image {result.image_id[:16]}; the next gc removes"
            f" it (import with --ref NAME, or: {PROG} ref add NAME {result.image_id})\n"
        )
    if a.json:
        print_json(asdict(result))
    else:
        print(result.image_id)
    return 0


def _load_tree(source: str, is_image: bool) -> Any:
    from composefs import dumpfile
    from composefs.erofs.reader import load_tree

    if is_image:
        return load_tree(source)
    return dumpfile.load(source)


def _images(repo: Any, a: argparse.Namespace) -> int:
    entries = repo.images()
    if a.json:
        print_json([asdict(e) for e in entries])
        return 0
    for e in entries:
        size = "missing" if e.size is None else _size(e.size)
        print(f"{e.id}  {size:>10}  {', '.join(e.refs)}")
    return 0


def _ref(repo: Any, a: argparse.Namespace) -> int:
    if a.ref_command == "add":
        repo.add_ref(a.name, a.target)
    elif a.ref_command == "rm":
        for name in a.names:
            repo.remove_ref(name)
    else:
        refs = repo.refs()
        if a.json:
            print_json(refs)
        else:
            for name, image_id in refs.items():
                print(f"{name} -> {image_id}")
    return 0


def _mount(repo: Any, a: argparse.Namespace) -> int:
    from composefs.fuse import FuseError
    from composefs.mount import MountError

    if a.foreground and not a.fuse:
        raise UsageError(f"{PROG}: --foreground goes with --fuse")
    try:
        repo.mount(a.name, a.mountpoint, fuse=a.fuse, foreground=a.foreground)
    except (MountError, FuseError) as e:
        return fail(PROG, str(e))
    return 0


def _gc(repo: Any, a: argparse.Namespace) -> int:
    r = repo.gc(dry_run=a.dry_run)
    if a.json:
        print_json(asdict(r))
        return 0
    verb = "would remove" if r.dry_run else "removed"
    for image_id in r.images_removed:
        print(f"{verb} image {image_id}")
    print(
        f"{verb.capitalize()} {len(r.images_removed)} images, {r.objects_removed} objects "
        f"({_size(r.bytes_removed)}), {r.temporary_files_removed} temporary files"
    )
    return 0


def _fsck(repo: Any, a: argparse.Namespace) -> int:
    from composefs.progress import Progress

    bar = Progress("checking objects")
    try:
        r = repo.fsck(repair=a.repair, progress=lambda done, total: bar.update(done, total, 0, 0))
    finally:
        bar.done()
    if a.json:
        print_json(r.to_json())
    else:
        for p in r.problems:
            print(f"{p.path}: {p.kind}: {p.detail}")
        for action in r.repaired:
            print(f"repaired: {action}")
        state = "ok" if r.ok else f"{len(r.problems)} problems"
        print(
            f"{r.objects_checked} objects, {r.images_checked} images, {r.refs_checked} refs "
            f"checked ({'secure' if r.secure else 'insecure'} repository): {state}"
        )
        if r.temporary_files:
            print(f"{r.temporary_files} temporary files left by interrupted writes (gc removes)")
    return 0 if r.ok else 1


def _stats(repo: Any, a: argparse.Namespace) -> int:
    s = repo.stats()
    if a.json:
        print_json(asdict(s))
        return 0
    heads = ("FILES", "CONTENT", "STORED", "UNIQUE", "SHARED")
    print(f"{'IMAGE':<16} {heads[0]:>8} " + " ".join(f"{h:>10}" for h in heads[1:]) + "  REFS")
    for i in s.images:
        print(
            f"{i.id[:16]} {i.files:>8} {_size(i.bytes):>10} {_size(i.referenced_bytes):>10} "
            f"{_size(i.unique_bytes):>10} {_size(i.shared_bytes):>10}  {', '.join(i.refs)}"
        )
    print(
        f"{len(s.images)} images; {s.objects} objects, {_size(s.stored_bytes)} stored; "
        f"content {_size(s.content_bytes)} in {_size(s.referenced_bytes)} of objects: "
        f"sharing saves {_size(s.saved_bytes)}; "
        f"unreferenced {s.unreferenced_objects} objects, {_size(s.unreferenced_bytes)}"
    )
    return 0


def _oci(repo: Any, a: argparse.Namespace) -> int:
    from composefs.cli.ocicmd import run

    return run(repo, a)


COMMANDS = {
    "oci": _oci,
    "import": _import,
    "images": _images,
    "ref": _ref,
    "mount": _mount,
    "gc": _gc,
    "fsck": _fsck,
    "stats": _stats,
}


def entry() -> None:
    console_entry(main)
