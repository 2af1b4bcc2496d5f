#!/usr/bin/env python3
"""Benchmark: a composefs repository (cfsctl) on a /usr-sized tree.

Imports the source tree (default: /usr) into a fresh repository with the caches dropped
(when run as root), then again into the same repository (every object reused), then a
few trees that each share ~95% of their files with it (hardlinked copies with 5% of the
files rewritten).  With those images in the repository it times gc with nothing to
remove, gc after removing one ref, and fsck.  Last, when the reference mkcomposefs is
found, compares an import into an empty and into a populated repository with
``mkcomposefs --digest-store`` into an empty and a populated store (the nearest thing
the reference has), both with the page cache warm.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from measure import REPO, drop_caches, find_reference, measure

INLINE_MAX = 64  # files up to this size are embedded in the image: they make no object


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def regular_files(root: Path) -> list[Path]:
    """Every regular file below ``root`` holding more than ``INLINE_MAX`` bytes."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and st.st_size > INLINE_MAX:
                out.append(p)
    return out


def modified_copy(source: Path, dest: Path, fraction: float, rng: random.Random) -> int:
    """A copy of ``source`` at ``dest``: hardlinks (a full copy if they cannot be made)
    except for ``fraction`` of its files with content, which get a changed copy of their
    own.  Returns how many were changed."""
    if subprocess.run(["cp", "-al", str(source), str(dest)], capture_output=True).returncode:
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
    files = regular_files(dest)
    changed = 0
    for p in rng.sample(files, len(files)):
        if changed >= round(len(files) * fraction):
            break
        try:
            data = p.read_bytes()
        except OSError:
            continue  # unreadable: pick another
        tmp = p.with_name(p.name + ".bench-changed")
        tmp.write_bytes(data + b"\n# changed by bench_repository\n")
        shutil.copystat(p, tmp, follow_symlinks=False)
        os.replace(tmp, p)  # the original, still linked from the source, is untouched
        changed += 1
    return changed


def tree_size(root: Path) -> tuple[int, int]:
    files = regular_files(root)
    return len(files), sum(p.lstat().st_size for p in files)


class Bench:
    def __init__(self, cfsctl: str, cold: bool) -> None:
        self.cfsctl = cfsctl
        self.cold = cold
        self.rows: list[str] = []

    def run(self, repo: Path, *args: str, cold: bool = False) -> tuple[float, float, int, Any]:
        subprocess.run(["sync"], check=True)  # earlier writeback is not this run's
        if cold and self.cold:
            drop_caches()
        wall, cpu, rss, out = measure([self.cfsctl, "--repo", str(repo), *args, "--json"])
        return wall, cpu, rss, json.loads(out)

    def row(self, label: str, wall: float, cpu: float, rss: int, what: str) -> None:
        line = f"  {label:44s} {wall:8.2f} s {cpu:8.2f} s {rss / 1024:7.0f} MiB  {what}".rstrip()
        self.rows.append(line)
        print(line, flush=True)

    def imported(self, label: str, repo: Path, src: Path, ref: str, cold: bool = False) -> float:
        wall, cpu, rss, r = self.run(repo, "import", str(src), "--ref", ref, cold=cold)
        what = (
            f"{r['objects_added']:7d} objects, {_size(r['bytes_added']):>9s} written; "
            f"{r['objects_reused']} reused"
        )
        self.row(label, wall, cpu, rss, what)
        return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default="/usr", help="tree to import (default /usr)")
    ap.add_argument("--ours", default=str(REPO / ".venv/bin/cfsctl"), help="cfsctl to time")
    ap.add_argument("--reference", help="path of the reference mkcomposefs")
    ap.add_argument("--images", type=int, default=3, help="trees sharing 95%% (default 3)")
    ap.add_argument("--changed", type=float, default=0.05, help="their changed fraction")
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--seed", type=int, default=1, help="which files get changed")
    args = ap.parse_args()
    source = Path(args.source)
    ours_mkcomposefs = str(Path(args.ours).with_name("mkcomposefs"))
    reference = find_reference(args.reference, "mkcomposefs", ours_mkcomposefs)
    cold = os.geteuid() == 0
    bench = Bench(args.ours, cold)
    rng = random.Random(args.seed)

    files, size = tree_size(source)
    print(f"source: {source}: {files} files with content, {_size(size)}")
    print(f"  {'':44s} {'wall':>10s} {'cpu':>10s} {'peak RSS':>12s}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run([args.ours, "--repo", str(repo), "init"], check=True, capture_output=True)
        caches = "caches dropped" if cold else "caches not dropped: not root"
        bench.imported(f"import, fresh repository ({caches})", repo, source, "base", cold=True)
        bench.imported("import again (all objects reused)", repo, source, "again")
        for k in range(1, args.images + 1):
            copy = Path(tmp) / f"copy{k}"
            changed = modified_copy(source, copy, args.changed, rng)
            bench.imported(f"tree sharing 95% #{k} ({changed} changed)", repo, copy, f"mod{k}")
            shutil.rmtree(copy)
        images = 1 + args.images
        wall, cpu, rss, r = bench.run(repo, "gc")
        removed = f"removed {r['objects_removed']} objects, {r['temporary_files_removed']} temp"
        bench.row(f"gc, {images} images, nothing to remove", wall, cpu, rss, removed)
        subprocess.run([args.ours, "--repo", str(repo), "ref", "rm", "mod1"], check=True)
        wall, cpu, rss, r = bench.run(repo, "gc")
        removed = (
            f"removed {len(r['images_removed'])} image, {r['objects_removed']} objects, "
            f"{_size(r['bytes_removed'])}"
        )
        bench.row("gc after removing one ref", wall, cpu, rss, removed)
        for state in ("cold", "warm") if cold else ("warm",):
            wall, cpu, rss, r = bench.run(repo, "fsck", cold=state == "cold")
            ok = "ok" if r["ok"] else f"{len(r['problems'])} PROBLEMS"
            checked = f"{r['objects_checked']} objects, {r['images_checked']} images: {ok}"
            bench.row(f"fsck ({state} cache)", wall, cpu, rss, checked)
        shutil.rmtree(repo)

        if not reference:
            print("  (reference mkcomposefs not found; pass --reference PATH)")
            return 0
        print("vs reference mkcomposefs --digest-store (page cache warm)")
        results: dict[tuple[str, str], float] = {}
        fresh = Path(tmp) / "fresh"
        store = Path(tmp) / "store"
        subprocess.run([args.ours, "--repo", str(fresh), "init"], check=True, capture_output=True)
        image = Path(tmp) / "reference.img"
        for case in ("empty", "populated"):
            results[("ours", case)] = bench.imported(
                f"cfsctl import, {case} repository", fresh, source, case
            )
            subprocess.run(["sync"], check=True)
            wall, cpu, rss, _out = measure(
                [reference, f"--digest-store={store}", str(source), str(image)]
            )
            bench.row(f"mkcomposefs --digest-store, {case} store", wall, cpu, rss, "")
            results[("reference", case)] = wall
        for case in ("empty", "populated"):
            ratio = results[("ours", case)] / results[("reference", case)]
            print(f"  {case:9s} store: ours/reference wall time {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
