"""Shared by the benchmarks: time one run of a command in a fresh wrapper process."""

from __future__ import annotations

import os
import shutil
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


COMPILED_BIN = REPO / "build/compiled-venv/bin"


def our_builds(tool: str, given: str | None) -> dict[str, str]:
    """Our builds of ``tool`` to time: the one given, else the pure build of the running
    venv and, when scripts/build-compiled.sh has made it, the mypyc-compiled build."""
    if given:
        return {"composefs-py": given}
    builds = {"composefs-py": str(Path(sys.executable).parent / tool)}
    if (COMPILED_BIN / tool).exists():
        builds["compiled"] = str(COMPILED_BIN / tool)
    return builds


def find_reference(given: str | None, name: str, ours: str) -> str | None:
    """The reference tool to compare with: as given, else ``name`` on PATH; None when
    there is none, or when what PATH finds is ours."""
    reference = given or shutil.which(name)
    if reference and Path(reference).resolve() == Path(ours).resolve():
        return None
    return reference


def drop_caches() -> None:
    """Empty the page cache, dentries and inodes (root): the next run starts cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def meminfo_cached() -> int:
    """The page cache's size, from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Cached in /proc/meminfo")
