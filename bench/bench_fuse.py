#!/usr/bin/env python3
"""Benchmark: composefs-fuse, ours (verifying) and the reference's (not verifying), as root.

* ``find`` and ``ls -lR`` over the cs9 developer image (64k entries), cold (a fresh
  mount, caches dropped) and warm;
* a sequential read of a 1 GiB file, cold and warm, in MB/s;
* ``tar -cf - -C MNT . | cat >/dev/null`` over an image of a real tree (default ``/usr``),
  warm, in MB/s, beside the kernel mount of the same image;
* page-cache sharing: two mounts of that image, each tarred once from cold; how much
  ``Cached`` grows for the second one (near zero when the mounts share the objects' pages).

Times are best of N; ratios are ours / reference in the same run.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

from measure import CS9_DUMP, REPO, drop_caches, find_reference, meminfo_cached

from composefs import dumpfile
from composefs.erofs.writer import build_image
from composefs.mount import MountOptions, mount, unmount


def timed(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


@contextmanager
def fuse(exe: str, image: Path, store: Path, mnt: Path) -> Iterator[None]:
    options = f"source={image},basedir={store}" + EXTRA_OPTIONS.get(exe, "")
    proc = subprocess.Popen([exe, "-f", "-o", options, str(mnt)])
    try:
        for _ in range(600):
            if os.path.ismount(mnt):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{exe} exited with {proc.returncode}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{exe} did not mount {mnt}")
        yield
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        proc.wait(timeout=30)


@contextmanager
def kernel(image: Path, store: Path, mnt: Path) -> Iterator[None]:
    mount(image, mnt, MountOptions(basedirs=(str(store),), readonly=True))
    try:
        yield
    finally:
        unmount(mnt)


Mounter = Callable[[], AbstractContextManager[None]]
EXTRA_OPTIONS: dict[str, str] = {}  # more -o options for a server, by executable
Rows = dict[str, tuple[float, ...]]


def cold_warm(mounter: Mounter, cmd: str, runs: int) -> tuple[float, float]:
    cold, warm = [], []
    for _ in range(runs):
        drop_caches()
        with mounter():
            cold.append(timed(cmd))
            warm.append(timed(cmd))
    return min(cold), min(warm)


def report(title: str, rows: Rows, unit: str) -> None:
    """One line per server; ours also as a ratio of the reference's figures."""
    print(title)
    for name, values in rows.items():
        shown = "  ".join(f"{v:9.1f} {unit}" for v in values)
        ratio = ""
        if name == "composefs-py" and "reference" in rows:
            pairs = zip(values, rows["reference"], strict=True)
            ratio = "  (" + ", ".join(f"{v / r:.2f}x" for v, r in pairs) + " of reference)"
        print(f"  {name:14s} {shown}{ratio}")


def metadata_test(servers: dict[str, str], tmp: Path, mnt: Path, runs: int) -> None:
    """find and ls -lR over the cs9 tree (no objects needed: nothing is opened)."""
    cs9, empty = tmp / "cs9.cfs", tmp / "empty"
    empty.mkdir()
    cs9.write_bytes(build_image(dumpfile.parse(gzip.decompress(CS9_DUMP.read_bytes()))))
    for walk, cmd in (("find", f"find {mnt}"), ("ls -lR", f"ls -lR {mnt}")):
        rows: Rows = {}
        for name, exe in servers.items():
            cold, warm = cold_warm(lambda e=exe: fuse(e, cs9, empty, mnt), cmd, runs)
            rows[name] = (cold * 1000, warm * 1000)
        cold, warm = cold_warm(lambda: kernel(cs9, empty, mnt), cmd, runs)
        rows["kernel mount"] = (cold * 1000, warm * 1000)
        report(f"{walk} over cs9 (cold, warm)", rows, "ms")


def read_test(servers: dict[str, str], tmp: Path, mnt: Path, runs: int) -> None:
    """cat of a 1 GiB file, cold and warm."""
    src, store, image = tmp / "big-src", tmp / "big-store", tmp / "big.cfs"
    src.mkdir()
    with open(src / "big", "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
    mkcomposefs = str(REPO / ".venv/bin/mkcomposefs")
    subprocess.run([mkcomposefs, f"--digest-store={store}", str(src), str(image)], check=True)
    shutil.rmtree(src)
    cmd = f"cat {mnt}/big"
    rows: Rows = {}
    for name, exe in servers.items():
        cold, warm = cold_warm(lambda e=exe: fuse(e, image, store, mnt), cmd, runs)
        rows[name] = ((1 << 30) / cold / 1e6, (1 << 30) / warm / 1e6)
    cold, warm = cold_warm(lambda: kernel(image, store, mnt), cmd, runs)
    rows["kernel mount"] = ((1 << 30) / cold / 1e6, (1 << 30) / warm / 1e6)
    report("sequential read of 1 GiB (cold, warm)", rows, "MB/s")
    shutil.rmtree(store)


def tar_test(
    servers: dict[str, str], tmp: Path, mnt: Path, runs: int, source: str, built: Path | None
) -> None:
    """Warm tar of a real tree to a pipe, and page-cache sharing between two mounts.

    Every server (and the kernel mount) is mounted at once and warmed; then each round
    tars through each of them in turn, the order rotating, so that the machine's drift
    during the test (other jobs, writeback) falls on all of them alike."""
    if built is not None:
        store, image = built / "store", built / "tree.cfs"
    else:
        store, image = tmp / "tree-store", tmp / "tree.cfs"
    if not image.exists():
        mkcomposefs = str(REPO / ".venv/bin/mkcomposefs")
        subprocess.run([mkcomposefs, f"--digest-store={store}", source, str(image)], check=True)
    du = subprocess.run(["du", "-sb", str(store)], capture_output=True, text=True, check=True)
    total = int(du.stdout.split()[0])
    print(f"tar source: {source}, {total / 1e9:.2f} GB of objects")
    names = [*servers, "kernel mount"]
    times: dict[str, list[float]] = {name: [] for name in names}
    with ExitStack() as stack:
        points = {name: tmp / f"tar-mnt{i}" for i, name in enumerate(names)}
        for name, point in points.items():
            point.mkdir()
            if name in servers:
                stack.enter_context(fuse(servers[name], image, store, point))
            else:
                stack.enter_context(kernel(image, store, point))
        for point in points.values():
            timed(f"tar -cf - -C {point} . | cat >/dev/null")  # warm up
        for run in range(runs):
            for name in names[run % len(names) :] + names[: run % len(names)]:
                times[name].append(timed(f"tar -cf - -C {points[name]} . | cat >/dev/null"))
    rows: Rows = {
        name: (total / min(t) / 1e6, total / statistics.median(t) / 1e6)
        for name, t in times.items()
    }
    report(f"warm tar to a pipe (best, median of {runs})", rows, "MB/s")

    print("page cache, two mounts of one image: Cached growth for the first and second tar")
    mnt2 = tmp / "mnt2"
    mnt2.mkdir()
    for name, exe in servers.items():
        with fuse(exe, image, store, mnt), fuse(exe, image, store, mnt2):
            drop_caches()
            c0 = meminfo_cached()
            timed(f"tar -cf - -C {mnt} . | cat >/dev/null")
            c1 = meminfo_cached()
            timed(f"tar -cf - -C {mnt2} . | cat >/dev/null")
            c2 = meminfo_cached()
        print(f"  {name:14s} first {(c1 - c0) / 1e6:8.0f} MB  second {(c2 - c1) / 1e6:8.0f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reference", help="path of the reference composefs-fuse")
    ap.add_argument("--ours", default=str(REPO / ".venv/bin/composefs-fuse"))
    ap.add_argument("--source", default="/usr", help="tree for the tar test (default /usr)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--tar-store", type=Path,
        help="keep the tar test's image and store in this directory and reuse them next "
        "time (building them from /usr takes minutes)",
    )  # fmt: skip
    ap.add_argument(
        "--our-options", default="",
        help="more -o options for our server, e.g. nopassthrough (the mode ordinary users get)",
    )  # fmt: skip
    ap.add_argument(
        "--only", choices=("metadata", "read", "tar"), action="append",
        help="run only these parts (repeatable; default: all)",
    )  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_fuse: needs root (dropping caches, kernel mounts)", file=sys.stderr)
        return 1
    reference = find_reference(args.reference, "composefs-fuse", args.ours)
    servers = {"composefs-py": args.ours}
    if args.our_options:
        EXTRA_OPTIONS[args.ours] = "," + args.our_options
    if reference:
        servers["reference"] = reference
    parts = args.only or ["metadata", "read", "tar"]
    with tempfile.TemporaryDirectory(prefix="bench-fuse-") as tmp_name:
        tmp = Path(tmp_name)
        mnt = tmp / "mnt"
        mnt.mkdir()
        if "metadata" in parts:
            metadata_test(servers, tmp, mnt, args.runs)
        if "read" in parts:
            read_test(servers, tmp, mnt, args.runs)
        if "tar" in parts:
            tar_test(servers, tmp, mnt, args.runs, args.source, args.tar_store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
