#!/usr/bin/env python3
"""Benchmark: rootless mounts (``composefs-fuse --rootless``) against plain FUSE and the
kernel mount, all read by an ordinary user (nobody); run as root.

* warm ``tar -cf - -C MNT . | cat >/dev/null`` over an image of a real tree (default
  ``/usr``): the first run after mounting (the rootless server checks each object then,
  plain FUSE hashes and caches everything) and the best of N warm runs;
* page-cache sharing: two mounts of the same image (so every object is shared), caches
  dropped, each tarred once; how much ``Cached`` grows for the second one.

The mounts: ``kernel`` (EROFS + overlayfs, mounted by root), ``rootless`` (composefs-fuse
--rootless run by nobody: FUSE metadata, overlayfs in nobody's user namespace reading the
objects), ``fuse`` (composefs-fuse run by nobody, every read through the server: no
passthrough for ordinary users).  /dev/fuse is opened to all users for the run (as
distributions ship it) and restored afterwards.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from measure import REPO, drop_caches, meminfo_cached

from composefs.mount import MountOptions, mount, unmount

BIN = REPO / ".venv/bin"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

Mounter = Callable[[Path], AbstractContextManager[Path]]


def tar(path: Path) -> float:
    """Seconds for nobody to tar the tree at ``path`` to a pipe."""
    cmd = f"tar --ignore-failed-read -cf - -C {path} . 2>/dev/null | cat >/dev/null"
    t = time.perf_counter()
    subprocess.run([*NOBODY, "sh", "-c", cmd], check=True)
    return time.perf_counter() - t


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(1200):
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        if any(line.split()[4] == str(mnt) for line in lines):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"composefs-fuse exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{mnt} was not mounted")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mounters(image: Path, store: Path) -> dict[str, Mounter]:
    @contextmanager
    def kernel(mnt: Path) -> Iterator[Path]:
        mount(image, mnt, MountOptions(basedirs=(str(store),), readonly=True))
        try:
            yield mnt
        finally:
            unmount(mnt)

    @contextmanager
    def rootless(mnt: Path) -> Iterator[Path]:
        opts = f"source={image},basedir={store}"
        proc = subprocess.Popen(
            [*NOBODY, str(BIN / "composefs-fuse"), "--rootless", "-f", "-o", opts, str(mnt)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready, _w, _x = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else b""
            if not line.strip():
                raise RuntimeError("composefs-fuse --rootless did not mount")
            yield Path(f"/proc/{int(line)}/root{mnt}")
        finally:
            _stop(proc)

    @contextmanager
    def fuse(mnt: Path) -> Iterator[Path]:
        opts = f"source={image},basedir={store}"
        proc = subprocess.Popen([*NOBODY, str(BIN / "composefs-fuse"), "-f", "-o", opts, str(mnt)])
        try:
            _wait_mounted(mnt, proc)
            yield mnt
        finally:
            subprocess.run([*NOBODY, "fusermount3", "-u", str(mnt)], check=False)
            _stop(proc)

    return {"kernel": kernel, "rootless": rootless, "fuse": fuse}


def _open_to_all(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default="/usr", help="tree to tar (default /usr)")
    ap.add_argument("--runs", type=int, default=3, help="warm runs (best is shown)")
    ap.add_argument(
        "--only", choices=("kernel", "rootless", "fuse"), action="append",
        help="mounts to measure (repeatable; default all)",
    )  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_rootless: needs root (dropping caches, kernel mounts)", file=sys.stderr)
        return 1
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    base = Path(tempfile.mkdtemp(prefix="bench-rootless-", dir="/tmp"))
    try:
        base.chmod(0o755)
        store, image = base / "store", base / "tree.cfs"
        t = time.perf_counter()
        subprocess.run(
            [str(BIN / "mkcomposefs"), f"--digest-store={store}", args.source, str(image)],
            check=True,
        )  # fmt: skip
        _open_to_all(store)
        image.chmod(0o644)
        du = subprocess.run(["du", "-sb", str(store)], capture_output=True, text=True, check=True)
        total = int(du.stdout.split()[0])
        entries = sum(1 for _ in Path(args.source).rglob("*"))
        print(
            f"tree: {args.source}, {entries} entries, {total / 1e9:.2f} GB of objects "
            f"(image and store built in {time.perf_counter() - t:.0f} s)"
        )
        os.chmod("/dev/fuse", 0o666)
        every = mounters(image, store)
        chosen = {k: v for k, v in every.items() if not args.only or k in args.only}
        mnts = [base / "mnt1", base / "mnt2"]
        for m in mnts:
            m.mkdir()
            os.chown(m, 65534, 65534)  # fusermount3 mounts where the user may write

        print(f"\nwarm tar to a pipe, as nobody (first run after mounting; best of {args.runs})")
        warm: dict[str, float] = {}
        for name, mounter in chosen.items():
            drop_caches()
            with mounter(mnts[0]) as path:
                first = tar(path)
                warm[name] = min(tar(path) for _ in range(args.runs))
            print(
                f"  {name:9s} first {first:7.2f} s   warm {warm[name]:7.2f} s"
                f"  {total / warm[name] / 1e6:7.0f} MB/s"
            )
        if "kernel" in warm:
            for name, seconds in warm.items():
                if name != "kernel":
                    print(f"  {name} / kernel (warm): {seconds / warm['kernel']:.2f}x")

        print("\npage cache, two mounts of one image: Cached growth for the first and second tar")
        for name, mounter in chosen.items():
            with mounter(mnts[0]) as one, mounter(mnts[1]) as two:
                drop_caches()
                c0 = meminfo_cached()
                tar(one)
                c1 = meminfo_cached()
                tar(two)
                c2 = meminfo_cached()
            print(
                f"  {name:9s} first {(c1 - c0) / 1e6:7.0f} MB   second {(c2 - c1) / 1e6:7.0f} MB"
                f" ({(c2 - c1) / total:6.1%} of the data)"
            )
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if line.split()[4].startswith(str(base)):
                subprocess.run(["umount", "-l", line.split()[4]], check=False)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
