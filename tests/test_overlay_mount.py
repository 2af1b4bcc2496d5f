"""The whole chain with the real kernel: directory -> image + object store -> EROFS mount +
overlayfs (metacopy, redirect, the store as a data-only lower layer) -> the same tree.

Root only (mounting); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_scan import make_tree

BIN = Path(sys.executable).parent


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "mounting EROFS and overlayfs needs root"
    filesystems = Path("/proc/filesystems").read_text()
    if "erofs" not in filesystems:
        return "the kernel has no EROFS"
    if "overlay" not in filesystems:
        subprocess.run(["modprobe", "overlay"], capture_output=True)
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "the kernel has no overlayfs"
    return None


@pytest.fixture
def composefs_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Builds an image of a test tree with its store and mounts it; yields (source, mnt)."""
    reason = _skip_reason()
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


WHITEOUT_DIR_MARKERS = (
    "trusted.overlay.opaque",
    "trusted.overlay.whiteouts",
    "user.overlay.opaque",
    "user.overlay.whiteouts",
)


def _holds_whiteout(directory: Path) -> bool:
    for entry in directory.iterdir():
        st = entry.lstat()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return True
    return False


def _xattrs(path: Path) -> dict[str, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if name == "security.selinux":
            continue  # the kernel may label either side
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def test_mounted_tree_equals_source(composefs_mount: tuple[Path, Path]) -> None:
    src, mnt = composefs_mount
    checked = 0
    for dirpath, dirnames, filenames in os.walk(src):
        for name in [*dirnames, *filenames]:
            a = Path(dirpath) / name
            b = mnt / a.relative_to(src)
            sa, sb = os.lstat(a), os.lstat(b)
            whiteout = stat.S_ISCHR(sa.st_mode) and sa.st_rdev == 0
            if whiteout:
                # stored escaped; a single-layer overlay shows an empty regular file
                assert stat.S_ISREG(sb.st_mode) and sb.st_size == 0, b
            else:
                assert sb.st_mode == sa.st_mode, b
                assert sb.st_rdev == sa.st_rdev, b
            assert (sb.st_uid, sb.st_gid) == (sa.st_uid, sa.st_gid), b
            assert sb.st_mtime_ns == sa.st_mtime_ns, b
            if stat.S_ISREG(sa.st_mode):
                assert sb.st_size == sa.st_size, b
                assert b.read_bytes() == a.read_bytes(), b  # through the object store
            elif stat.S_ISLNK(sa.st_mode):
                assert os.readlink(b) == os.readlink(a), b
            if not stat.S_ISLNK(sa.st_mode) and not whiteout:
                seen = _xattrs(b)
                if stat.S_ISDIR(sa.st_mode) and _holds_whiteout(a):
                    # the markers of a directory with escaped whiteouts (format.md §5.4)
                    for key in WHITEOUT_DIR_MARKERS:
                        seen.pop(key, None)
                assert seen == _xattrs(a), b
            checked += 1
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
