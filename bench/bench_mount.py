#!/usr/bin/env python3
"""Benchmark: kernel mounts of the cs9 developer image (64k entries), as root.

* mount time: our ``mount.composefs`` (a process, as ``mount -t composefs`` runs it), our
  ``composefs.mount.mount`` called in-process, and the reference ``mount.composefs``;
* ``find MNT`` and ``ls -lR MNT`` over the mounted tree, cold (page cache, dentries and
  inodes dropped first) and warm, through our mount, the reference's mount and a plain
  directory holding the same tree (empty sparse files of the right sizes).

After the mount the kernel does all the work, so the two mounts must agree within noise;
the plain directory shows what composefs costs (or saves) over an ordinary filesystem.
Objects are not needed: listing never opens file content.
"""

from __future__ import annotations

import argparse
import gzip
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from measure import CS9_DUMP, REPO, drop_caches, find_reference

from composefs import dumpfile
from composefs.erofs.writer import build_image
from composefs.mount import MountOptions, mount, unmount
from composefs.tree import Tree


def best(runs: int, once: Callable[[], float]) -> float:
    return min(once() for _ in range(runs))


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def cold_and_warm(cmd: list[str], runs: int) -> tuple[float, float]:
    """Best cold run (caches dropped before each) and best warm run of a command."""
    cold = []
    for _ in range(runs):
        drop_caches()
        cold.append(timed(cmd))
    return min(cold), best(runs, lambda: timed(cmd))


def materialize(tree: Tree, root: Path) -> None:
    """The tree as a plain directory: same names, types, modes and sizes (sparse)."""
    for path, node in tree.walk():
        target = root / os.fsdecode(path.lstrip(b"/")) if path != b"/" else root
        ftype = stat.S_IFMT(node.mode)
        if ftype == stat.S_IFDIR:
            target.mkdir(exist_ok=True)
        elif ftype == stat.S_IFLNK:
            os.symlink(node.payload or b"x", target)
            continue
        elif ftype == stat.S_IFREG:
            if target.exists():
                continue  # a further name of a hardlinked file
            with open(target, "wb") as f:
                f.truncate(node.size)
        else:
            os.mknod(target, node.mode, node.rdev)
        os.chmod(target, stat.S_IMODE(node.mode))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dump", default=str(CS9_DUMP))
    ap.add_argument("--reference", help="path of the reference mount.composefs")
    ap.add_argument("--ours", default=str(REPO / ".venv/bin/mount.composefs"))
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_mount: mounting needs root", file=sys.stderr)
        return 1
    reference = find_reference(args.reference, "mount.composefs", args.ours)

    raw = Path(args.dump).read_bytes()
    data = gzip.decompress(raw) if args.dump.endswith(".gz") else raw
    tree = dumpfile.parse(data)
    with tempfile.TemporaryDirectory(prefix="bench-mount-") as tmp_name:
        tmp = Path(tmp_name)
        image, objects, mnt, plain = tmp / "cs9.cfs", tmp / "objects", tmp / "mnt", tmp / "plain"
        image.write_bytes(build_image(tree))
        for d in (objects, mnt, plain):
            d.mkdir()
        materialize(tree, plain)
        options = ["-o", f"ro,basedir={objects}", str(image), str(mnt)]
        print(f"image: {Path(args.dump).name}, {image.stat().st_size} bytes; best of {args.runs}")

        def cli_mount(exe: str) -> Callable[[], float]:
            def once() -> float:
                t = timed([exe, *options])
                unmount(mnt)
                return t

            return once

        def api_mount() -> float:
            t = time.perf_counter()
            mount(image, mnt, MountOptions(basedirs=(str(objects),), readonly=True))
            t = time.perf_counter() - t
            unmount(mnt)
            return t

        print("mount time")
        times = {"composefs-py (process)": best(args.runs, cli_mount(args.ours))}
        times["composefs-py (API)"] = best(args.runs, api_mount)
        if reference:
            times["reference"] = best(args.runs, cli_mount(reference))
        for name, t in times.items():
            ratio = f"  ({t / times['reference']:.2f}x)" if reference else ""
            print(f"  {name:24s} {t * 1000:8.1f} ms{ratio}")

        setups: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            "composefs-py": (
                lambda: subprocess.run([args.ours, *options], check=True),
                lambda: unmount(mnt),
            ),
        }
        if reference:
            ref = reference
            setups["reference"] = (
                lambda: subprocess.run([ref, *options], check=True),
                lambda: unmount(mnt),
            )
        walks = {"find": ["find", "{}"], "ls -lR": ["ls", "-lR", "{}"]}
        for walk, template in walks.items():
            print(walk)
            rows: dict[str, tuple[float, float]] = {}
            for name, (setup, teardown) in setups.items():
                cmd = [str(mnt) if a == "{}" else a for a in template]
                setup()
                try:
                    rows[name] = cold_and_warm(cmd, args.runs)
                finally:
                    teardown()
            plain_cmd = [str(plain) if a == "{}" else a for a in template]
            rows["plain directory"] = cold_and_warm(plain_cmd, args.runs)
            for name, (cold, warm) in rows.items():
                ratio = ""
                if reference and name != "reference":
                    rc, rw = rows["reference"]
                    ratio = f"  (vs reference: cold {cold / rc:.2f}x, warm {warm / rw:.2f}x)"
                print(f"  {name:16s} cold {cold * 1000:7.1f} ms  warm {warm * 1000:7.1f} ms{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
