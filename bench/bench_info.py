#!/usr/bin/env python3
"""Benchmark: reading images back.

* ``composefs-info dump`` of the image built from the cs9 developer dump (64k entries),
  ours and the reference's side by side (best of N runs, wall and CPU time, ratio);
* ``composefs-info --filter=etc ls`` (only one top-level directory is read);
* a single-path lookup through the Python API (``Image.lookup``), per call.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

from measure import CS9_DUMP, find_reference, measure, our_builds

from composefs import dumpfile
from composefs.erofs.reader import Image
from composefs.erofs.writer import build_image

LOOKUP_PATH = b"/usr/etc/NetworkManager/dispatcher.d/pre-up.d"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dump", type=Path, default=CS9_DUMP)
    ap.add_argument("--reference", help="path of the reference composefs-info")
    ap.add_argument("--ours", help="our composefs-info (default: the pure and compiled builds)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ours = our_builds("composefs-info", args.ours)
    reference = find_reference(args.reference, "composefs-info", ours["composefs-py"])

    data = args.dump.read_bytes()
    if args.dump.suffix == ".gz":
        data = gzip.decompress(data)
    image_bytes = build_image(dumpfile.parse(data))
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.img"
        image.write_bytes(image_bytes)
        tools = dict(ours)
        if reference:
            tools["reference"] = reference
        for _label, extra in (("dump", ["dump"]), ("filtered ls", ["--filter=etc", "ls"])):
            best: dict[str, tuple[float, float]] = {}
            outputs = {}
            for _ in range(args.runs):
                for name, exe in tools.items():
                    wall, cpu, _rss, out = measure([exe, *extra, str(image)])
                    w0, c0 = best.get(name, (wall, cpu))
                    best[name] = (min(wall, w0), min(cpu, c0))
                    outputs[name] = out
            print(f"composefs-info {' '.join(extra)} ({args.dump.name}), best of {args.runs}")
            for name, (wall, cpu) in best.items():
                print(f"  {name:13s} wall {wall:6.3f} s  cpu {cpu:6.3f} s")
            if "reference" in best:
                ref = best["reference"]
                same = "identical" if len(set(outputs.values())) == 1 else "OUTPUT DIFFERS"
                for name in ours:
                    wall, cpu = best[name]
                    print(
                        f"  ratio {name}/reference: wall {wall / ref[0]:.2f}x,"
                        f" cpu {cpu / ref[1]:.2f}x ({same})"
                    )

        with Image(image) as img:
            n = 2000
            t = time.perf_counter()
            for _ in range(n):
                img.lookup(LOOKUP_PATH)
            per_call = (time.perf_counter() - t) / n
        print(f"Image.lookup({LOOKUP_PATH.decode()}): {per_call * 1e6:.1f} us per call")
    if not reference:
        print("(reference composefs-info not found; pass --reference PATH)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
