"""Differential test against the reference mkcomposefs on random trees (skipped without it).

The reference C tool is not part of this project; put its mkcomposefs on PATH (or set
COMPOSEFS_REFERENCE_MKCOMPOSEFS) to run these.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from randomtree import random_dump

from composefs import dumpfile
from composefs.erofs.writer import build_image
from composefs.errors import ComposefsError

OURS = Path(__file__).resolve()
REFERENCE = os.environ.get("COMPOSEFS_REFERENCE_MKCOMPOSEFS") or shutil.which("mkcomposefs")
if REFERENCE and "/.venv" in str(Path(REFERENCE).resolve()):
    REFERENCE = None  # that is ours

pytestmark = pytest.mark.skipif(REFERENCE is None, reason="reference mkcomposefs not on PATH")


@pytest.mark.parametrize("seed", range(150))
@pytest.mark.parametrize("versions", [(), ("--min-version=0",), ("--min-version=1",)])
def test_random_tree_same_image(seed: int, versions: tuple[str, ...], tmp_path: Path) -> None:
    assert REFERENCE is not None
    data = random_dump(seed)
    src = tmp_path / "in.dump"
    src.write_bytes(data)
    out = tmp_path / "ref.img"
    ref = subprocess.run(
        [REFERENCE, "--from-file", *versions, str(src), str(out)], capture_output=True
    )
    kwargs = {}
    if versions:
        v = int(versions[0].split("=")[1])
        kwargs = {"min_version": v, "max_version": 0}
    try:
        ours = build_image(dumpfile.parse(data, strict=False), **kwargs)
    except ComposefsError as e:
        assert ref.returncode != 0, f"we failed ({e}), the reference did not"
        return
    assert ref.returncode == 0, ref.stderr
    assert ours == out.read_bytes()
