"""The whole chain with the real kernel: directory -> image + object store -> EROFS mount +
overlayfs (metacopy, redirect, the store as a data-only lower layer) -> the same tree.

Root only (mounting); skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounted import assert_same_tree, kernel_mount_skip_reason
from test_scan import make_tree

BIN = Path(sys.executable).parent


@pytest.fixture
def composefs_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Builds an image of a test tree with its store and mounts it; yields (source, mnt)."""
    reason = kernel_mount_skip_reason()
    if reason:
        pytest.skip(reason)
    src = make_tree(tmp_path / "src", big=True)
    store, image = tmp_path / "store", tmp_path / "image.img"
    r = subprocess.run(
        [str(BIN / "mkcomposefs"), f"--digest-store={store}", str(src), str(image)],
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    meta, mnt = tmp_path / "meta", tmp_path / "mnt"
    meta.mkdir()
    mnt.mkdir()
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "-t", "erofs", "-o", "ro", str(image), str(meta)], check=True)
        mounted.append(meta)
        opts = f"ro,metacopy=on,redirect_dir=on,lowerdir={meta}::{store}"
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(f"overlayfs with a data-only layer failed: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        yield src, mnt
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", str(m)], check=False)


def test_mounted_tree_equals_source(composefs_mount: tuple[Path, Path]) -> None:
    src, mnt = composefs_mount
    checked = assert_same_tree(src, mnt)
    assert checked >= 3000


def test_second_image_shares_objects(composefs_mount: tuple[Path, Path], tmp_path: Path) -> None:
    src, _mnt = composefs_mount
    store = tmp_path / "store"
    before = sorted(p for p in store.rglob("*") if p.is_file())
    r = subprocess.run(
        [str(BIN / "mkcomposefs"), f"--digest-store={store}", str(src), str(tmp_path / "two.img")],
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p for p in store.rglob("*") if p.is_file()) == before
