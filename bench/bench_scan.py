#!/usr/bin/env python3
"""Benchmark: mkcomposefs from a directory, with an empty store, a populated store and none.

The source tree (default: /usr) is first copied into a scratch directory on the same
filesystem as the stores (``cp -a``), so both tools read the same files from the page
cache.  Each tool then runs: into an empty store, again into the now populated store, and
without a store.  Prints wall and CPU times and the ratios; the images must be identical.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import REPO, find_reference, measure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default="/usr", help="tree to copy and build (default /usr)")
    ap.add_argument("--reference", help="path of the reference mkcomposefs")
    ap.add_argument("--ours", default=str(REPO / ".venv/bin/mkcomposefs"))
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = ap.parse_args()
    reference = find_reference(args.reference, "mkcomposefs", args.ours)
    tools = {"composefs-py": args.ours}
    if reference:
        tools["reference"] = reference

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "tree"
        subprocess.run(["cp", "-a", args.source, str(src)], check=True)
        files = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        du = subprocess.run(["du", "-sb", str(src)], capture_output=True, text=True, check=True)
        gigabytes = int(du.stdout.split()[0]) / 1e9
        print(f"source: copy of {args.source}: {files} files, {gigabytes:.2f} GB")
        results: dict[tuple[str, str], tuple[float, float]] = {}
        images: dict[str, bytes] = {}
        for name, exe in tools.items():
            store = Path(tmp) / f"store-{name}"
            image = Path(tmp) / f"{name}.img"
            for case, extra in (
                ("empty store", [f"--digest-store={store}"]),
                ("populated store", [f"--digest-store={store}"]),
                ("no store", []),
            ):
                subprocess.run(["sync"], check=True)
                wall, cpu, _rss, _out = measure([exe, *extra, str(src), str(image)])
                results[(name, case)] = (wall, cpu)
            images[name] = image.read_bytes()
            shutil.rmtree(store)
    for case in ("empty store", "populated store", "no store"):
        line = f"  {case:16s}"
        for name in tools:
            wall, cpu = results[(name, case)]
            line += f"  {name} {wall:7.2f} s (cpu {cpu:6.2f})"
        if reference:
            ratio = results[("composefs-py", case)][0] / results[("reference", case)][0]
            line += f"  ratio {ratio:.2f}x"
        print(line)
    if reference:
        print("  images identical" if len(set(images.values())) == 1 else "  IMAGES DIFFER")
    else:
        print("  (reference mkcomposefs not found; pass --reference PATH)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
