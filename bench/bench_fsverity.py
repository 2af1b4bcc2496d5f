#!/usr/bin/env python3
"""Benchmark: fs-verity digest of a large file, ours (1 and N processes) vs `fsverity digest`.

The file is created once (random data) and read from the page cache in every run, so the
figures compare hashing, not the disk.  Prints throughput (MB/s) and ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from composefs import fsverity


def best_of(runs: int, fn: object) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", default=None, help="where to create the test file")
    args = ap.parse_args()

    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "data"
        with path.open("wb") as f:
            chunk = os.urandom(16 << 20)
            for _ in range(size // len(chunk)):
                f.write(chunk)
            f.write(os.urandom(size % len(chunk)))
        expected = fsverity.digest_file(path)  # also warms the page cache

        results: dict[str, float] = {}
        results["composefs-py, 1 process"] = best_of(args.runs, lambda: fsverity.digest_file(path))
        if args.workers > 1:
            results[f"composefs-py, {args.workers} processes"] = best_of(
                args.runs, lambda: fsverity.digest_file(path, workers=args.workers)
            )
        tool = shutil.which("fsverity")
        if tool:

            def run_tool() -> None:
                out = subprocess.run(
                    [tool, "digest", "--compact", str(path)], check=True, capture_output=True
                ).stdout
                assert out.decode().strip() == expected.hex()

            results["fsverity digest"] = best_of(args.runs, run_tool)

    print(f"{args.size_mib} MiB file, best of {args.runs} runs")
    for name, secs in results.items():
        print(f"  {name:28s} {secs:6.3f} s  {size / secs / 1e6:7.0f} MB/s")
    if "fsverity digest" in results:
        ref = results["fsverity digest"]
        for name, secs in results.items():
            if name != "fsverity digest":
                print(f"  throughput ratio {name} / fsverity: {ref / secs:.2f}x")
    else:
        print("  (fsverity not installed: no reference figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
