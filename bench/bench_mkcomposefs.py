#!/usr/bin/env python3
"""Benchmark: mkcomposefs --from-file on the 64k-entry cs9 developer dump.

Runs our mkcomposefs and, when found (on PATH or --reference), the reference C tool,
alternating runs so both see the same machine state.  Prints the best wall time, the peak
memory (max RSS of the child) and the ratio ours/reference.  Both images must be identical.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import tempfile
from pathlib import Path

from measure import CS9_DUMP, find_reference, measure, our_builds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dump", type=Path, default=CS9_DUMP)
    ap.add_argument("--reference", help="path of the reference mkcomposefs")
    ap.add_argument("--ours", help="our mkcomposefs (default: the pure and compiled builds)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ours = our_builds("mkcomposefs", args.ours)
    reference = find_reference(args.reference, "mkcomposefs", ours["composefs-py"])
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "input.dump"
        data = args.dump.read_bytes()
        dump.write_bytes(gzip.decompress(data) if args.dump.suffix == ".gz" else data)
        tools = dict(ours)
        if reference:
            tools["reference"] = reference
        best: dict[str, tuple[float, float, int]] = {}
        digests = {}
        for _ in range(args.runs):
            for name, exe in tools.items():
                out = Path(tmp) / f"{name}.img"
                wall, cpu, rss, _out = measure([exe, "--from-file", str(dump), str(out)])
                w0, c0, r0 = best.get(name, (wall, cpu, rss))
                best[name] = (min(wall, w0), min(cpu, c0), max(rss, r0))
                digests[name] = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"input: {args.dump.name}, best of {args.runs} runs")
    for name, (wall, cpu, rss) in best.items():
        print(f"  {name:13s} wall {wall:6.3f} s  cpu {cpu:6.3f} s  peak RSS {rss / 1024:6.1f} MiB")
    if "reference" in best:
        ref = best["reference"]
        for name in ours:
            wall, cpu, _rss = best[name]
            print(f"  ratio {name}/reference: wall {wall / ref[0]:.2f}x, cpu {cpu / ref[1]:.2f}x")
        if len(set(digests.values())) != 1:
            print("  IMAGES DIFFER:", digests)
            return 1
        print("  images identical")
    else:
        print("  (reference mkcomposefs not found; pass --reference PATH)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
