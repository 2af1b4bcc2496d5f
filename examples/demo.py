#!/usr/bin/env python3
"""The built-in example: build a composefs image from examples/demo.dump and inspect it;
then build one from a small directory tree with its object store and, as root, mount it.

Run through scripts/demo.sh (which installs everything first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
OUT = REPO / "build" / "demo"


def step(title: str, cmd: list[str]) -> str:
    print(f"\n$ {' '.join(cmd)}")
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if result.stdout:
        print(result.stdout, end="")
    return result.stdout


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    dump = HERE / "demo.dump"
    image = OUT / "demo.img"
    print(f"Input: {dump.relative_to(REPO)} ({sum(1 for _ in dump.open())} files)")
    digest = step(
        "build",
        [str(BIN / "mkcomposefs"), "--from-file", "--print-digest", str(dump), str(image)],
    ).strip()
    size = image.stat().st_size
    print(f"\nimage:   {image.relative_to(REPO)}")
    print(f"size:    {size} bytes ({size // 4096} blocks of 4096)")
    print(f"fs-verity digest: {digest}")
    if shutil.which("fsck.erofs"):
        subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)
        print("fsck.erofs: image is a valid EROFS filesystem")

    print("\nWhat the image holds (directories end in /, @ names the backing object):")
    step("list", [str(BIN / "composefs-info"), "ls", str(image)])
    print("\nObjects the image needs in its object store:")
    step("objects", [str(BIN / "composefs-info"), "objects", str(image)])
    from_directory()
    repository()
    return 0


def make_rootfs(root: Path) -> None:
    """A tiny root filesystem; the same bytes every run, so the same image digest."""
    if root.exists():
        shutil.rmtree(root)
    for d in ("etc", "usr/bin", "usr/lib", "var/tmp"):
        (root / d).mkdir(parents=True)
    (root / "etc/hostname").write_text("demo\n")
    (root / "etc/motd").write_text("Welcome to a composefs image.\n" * 40)
    (root / "usr/bin/hello").write_text("#!/bin/sh\necho 'hello from composefs'\n")
    (root / "usr/bin/hello").chmod(0o755)
    (root / "usr/lib/table.bin").write_bytes(bytes(range(256)) * 64)
    (root / "bin").symlink_to("usr/bin")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (1700000000, 1700000000), follow_symlinks=False)


def from_directory() -> None:
    rootfs, objects = OUT / "rootfs", OUT / "objects"
    image = OUT / "rootfs.cfs"
    make_rootfs(rootfs)
    print(f"\nFrom a directory: {rootfs.relative_to(REPO)}, its content into an object store")
    digest = step(
        "build",
        [str(BIN / "mkcomposefs"), "--print-digest", f"--digest-store={objects}",
         str(rootfs), str(image)],
    ).strip()  # fmt: skip
    stored = sorted(str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file())
    print(f"objects in {objects.relative_to(REPO)}: {', '.join(stored)}")
    mnt = OUT / "mnt"
    mnt.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        fuse_mount(image, objects, mnt)
        return
    print("\nMounted with the kernel: EROFS for the image, overlayfs reading the objects;")
    print("digest= makes the mount refuse any other image.")
    step(
        "mount",
        [str(BIN / "mount.composefs"), "-o", f"ro,basedir={objects},digest={digest}",
         str(image), str(mnt)],
    )  # fmt: skip
    try:
        step("findmnt", ["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", str(mnt)])
        step("ls", ["ls", "-l", str(mnt), str(mnt / "usr/bin")])
        step("run", ["sh", str(mnt / "usr/bin/hello")])
        step("read", ["head", "-n", "2", str(mnt / "etc/motd")])
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    print(f"unmounted {mnt.relative_to(REPO)}")


def fuse_mount(image: Path, objects: Path, mnt: Path) -> None:
    """Without root: the same image through composefs-fuse, every byte checked."""
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) or not shutil.which("fusermount3"):
        print("\n(not root, and no usable /dev/fuse and fusermount3: nothing to mount with)")
        return
    print("\nNot root: mounted with composefs-fuse instead, which checks every byte it")
    print("serves against the fs-verity digests recorded in the image.")
    step(
        "mount",
        [str(BIN / "composefs-fuse"), "-o", f"source={image},basedir={objects}", str(mnt)],
    )
    try:
        step("ls", ["ls", "-l", str(mnt), str(mnt / "usr/bin")])
        step("run", ["sh", str(mnt / "usr/bin/hello")])
        step("read", ["head", "-n", "2", str(mnt / "etc/motd")])
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    print(f"unmounted {mnt.relative_to(REPO)}")


def repository() -> None:
    """Two versions of the rootfs in one repository: the second stores only what changed."""
    repo = OUT / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    cfsctl = [str(BIN / "cfsctl"), "--repo", str(repo)]
    print("\nA repository: one object store for every image (composefs-rs's layout)")
    step("init", [*cfsctl, "init"])
    step("import", [*cfsctl, "import", "--use-epoch", str(OUT / "rootfs"), "--ref", "demo/v1"])
    v2 = OUT / "rootfs-v2"
    if v2.exists():
        shutil.rmtree(v2)
    shutil.copytree(OUT / "rootfs", v2, symlinks=True)
    (v2 / "etc/motd").write_text("Version 2 of the image.\n" * 40)
    print("\nVersion 2 changes one file; its import writes only that object:")
    step("import", [*cfsctl, "import", "--json", "--use-epoch", str(v2), "--ref", "demo/v2"])
    step("stats", [*cfsctl, "stats"])
    step("fsck", [*cfsctl, "fsck"])
    mnt = OUT / "mnt"
    if os.geteuid() == 0:
        print("\nMounting by ref: the image is checked against its id first.")
        step("mount", [*cfsctl, "mount", "demo/v2", str(mnt)])
        try:
            step("read", ["head", "-n", "1", str(mnt / "etc/motd")])
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    print("\nDropping the v1 ref lets gc reclaim what only v1 used:")
    step("ref rm", [*cfsctl, "ref", "rm", "demo/v1"])
    step("gc", [*cfsctl, "gc"])
    step("images", [*cfsctl, "images"])


if __name__ == "__main__":
    sys.exit(main())
