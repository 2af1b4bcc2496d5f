#!/usr/bin/env python3
"""Benchmark: mkcomposefs from a directory, with an empty store, a populated store and none.

The source tree (default: /usr) is first copied into a scratch directory on the same
filesystem as the stores (``cp -a``), so both tools read the same files from the page
cache.  Each tool (our pure and compiled builds, as bench_mkcomposefs, and the reference)
then runs: into an empty store, again into the now populated store, and without a store.
Prints wall and CPU times and the ratios; the images must be identical.

On ext4 without a journal, creating files near inodes deleted in the last minutes (six,
while their inode table blocks are dirty) is slow: a run right after a large store was
deleted measures that, not the tool.  So every round fills new stores, all removed at the
end, and runs of this benchmark should be some minutes apart.

Each tool's empty-store run starts from the same memory: as root, the caches are dropped
and the tree read back in first.  Otherwise a tool would pay for the page cache the tools
before it filled (a full cache makes every page it writes wait for reclaim), and the
order of the tools would decide the ratios.
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import drop_caches, find_reference, measure, our_builds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default="/usr", help="tree to copy and build (default /usr)")
    ap.add_argument("--reference", help="path of the reference mkcomposefs")
    ap.add_argument("--ours", help="our mkcomposefs (default: the pure and compiled builds)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--tree", help="build this tree as it is, without copying it first")
    ap.add_argument("--repeat", type=int, default=1, help="run every case this many times")
    args = ap.parse_args()
    ours = our_builds("mkcomposefs", args.ours)
    reference = find_reference(args.reference, "mkcomposefs", ours["composefs-py"])
    tools = dict(ours)
    if reference:
        tools["reference"] = reference

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.tree:
            src = Path(args.tree)
            origin = str(src)
        else:
            src = Path(tmp) / "tree"
            subprocess.run(["cp", "-a", args.source, str(src)], check=True)
            origin = f"copy of {args.source}"
        files = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        du = subprocess.run(["du", "-sb", str(src)], capture_output=True, text=True, check=True)
        gigabytes = int(du.stdout.split()[0]) / 1e9
        print(f"source: {origin}: {files} files, {gigabytes:.2f} GB")
        same_start = os.geteuid() == 0
        if not same_start:
            print("  (not root: caches not dropped, each tool starts with what the last left)")
        images: dict[str, bytes] = {}
        for run in range(args.repeat):
            results: dict[tuple[str, str], tuple[float, float]] = {}
            # Alternate which tool goes first: the machine's state drifts during a run.
            order = list(tools.items()) if run % 2 == 0 else list(reversed(tools.items()))
            for name, exe in order:
                store = Path(tmp) / f"store-{name}-{run}"
                image = Path(tmp) / f"{name}.img"
                for case, extra in (
                    ("empty store", [f"--digest-store={store}"]),
                    ("populated store", [f"--digest-store={store}"]),
                    ("no store", []),
                ):
                    if same_start and case == "empty store":
                        drop_caches()
                        _read_all(src)
                    subprocess.run(["sync"], check=True)
                    wall, cpu, _rss, _out = measure([exe, *extra, str(src), str(image)])
                    results[(name, case)] = (wall, cpu)
                images[name] = image.read_bytes()
            _report(results, list(tools), list(ours) if reference else [])
    if reference:
        print("  images identical" if len(set(images.values())) == 1 else "  IMAGES DIFFER")
    else:
        print("  (reference mkcomposefs not found; pass --reference PATH)")
    return 0


def _read_all(tree: Path) -> None:
    """Bring every inode and every file's content of ``tree`` into the caches."""
    for top, dirs, names in os.walk(tree):
        for name in dirs + names:
            path = os.path.join(top, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass


def _report(
    results: dict[tuple[str, str], tuple[float, float]], tools: list[str], ours: list[str]
) -> None:
    for case in ("empty store", "populated store", "no store"):
        line = f"  {case:16s}"
        for name in tools:
            wall, cpu = results[(name, case)]
            line += f"  {name} {wall:7.2f} s (cpu {cpu:6.2f})"
        for name in ours:
            ratio = results[(name, case)][0] / results[("reference", case)][0]
            line += f"  {name}/reference {ratio:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
