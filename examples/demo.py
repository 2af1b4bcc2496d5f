#!/usr/bin/env python3
"""The built-in example: build a composefs image from examples/demo.dump and inspect it.

Run through scripts/demo.sh (which installs everything first).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
OUT = REPO / "build" / "demo"


def step(title: str, cmd: list[str]) -> str:
    print(f"\n$ {' '.join(cmd)}")
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if result.stdout:
        print(result.stdout, end="")
    return result.stdout


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    dump = HERE / "demo.dump"
    image = OUT / "demo.img"
    print(f"Input: {dump.relative_to(REPO)} ({sum(1 for _ in dump.open())} files)")
    digest = step(
        "build",
        [str(BIN / "mkcomposefs"), "--from-file", "--print-digest", str(dump), str(image)],
    ).strip()
    size = image.stat().st_size
    print(f"\nimage:   {image.relative_to(REPO)}")
    print(f"size:    {size} bytes ({size // 4096} blocks of 4096)")
    print(f"fs-verity digest: {digest}")
    if shutil.which("fsck.erofs"):
        subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)
        print("fsck.erofs: image is a valid EROFS filesystem")

    print("\nWhat the image holds (directories end in /, @ names the backing object):")
    step("list", [str(BIN / "composefs-info"), "ls", str(image)])
    print("\nObjects the image needs in its object store:")
    step("objects", [str(BIN / "composefs-info"), "objects", str(image)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
