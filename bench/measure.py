"""Shared by the benchmarks: time one run of a command in a fresh wrapper process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CS9_DUMP = REPO.parent / "shared/testdata/upstream/cs9-x86_64-developer.dump.gz"

# ru_maxrss of RUSAGE_CHILDREN is a high-water mark over all children, so each run goes
# through a new wrapper whose only child is the command: its figures are that command's.
_WRAPPER = (
    "import resource,subprocess,sys,time;t=time.perf_counter();"
    "out=subprocess.run(sys.argv[1:],check=True,capture_output=True).stdout;"
    "w=time.perf_counter()-t;r=resource.getrusage(resource.RUSAGE_CHILDREN);"
    "sys.stdout.buffer.write(b'%f %f %d\\n' % (w, r.ru_utime+r.ru_stime, r.ru_maxrss) + out)"
)


def measure(cmd: list[str]) -> tuple[float, float, int, bytes]:
    """Wall seconds, CPU seconds (user + system), peak RSS (KiB) and stdout of one run."""
    res = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], check=True, capture_output=True)
    head, _, out = res.stdout.partition(b"\n")
    wall, cpu, rss = head.split()
    return float(wall), float(cpu), int(rss), out
