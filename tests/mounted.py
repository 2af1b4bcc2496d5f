"""Helpers for tests that mount images with the real kernel: why they must skip, and the
file-by-file comparison of a mounted tree with the directory it was built from."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path


def kernel_mount_skip_reason() -> str | None:
    """Why EROFS + overlayfs mounts cannot be tested here, or None if they can."""
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


def xattrs(path: Path, hide: Callable[[str], bool] | None = None) -> dict[str, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if name == "security.selinux":
            continue  # the kernel may label either side
        if hide is not None and hide(name):
            continue
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def assert_same_tree(src: Path, mnt: Path, *, use_epoch: bool = False) -> int:
    """Every entry of ``src`` as seen through the composefs mount ``mnt``: type, mode,
    owner, mtime (ns), size, content, symlink target, rdev, xattrs.  Returns the count."""
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
            assert sb.st_mtime_ns == (0 if use_epoch else sa.st_mtime_ns), b
            if stat.S_ISREG(sa.st_mode):
                assert sb.st_size == sa.st_size, b
                assert b.read_bytes() == a.read_bytes(), b  # through the object store
            elif stat.S_ISLNK(sa.st_mode):
                assert os.readlink(b) == os.readlink(a), b
            if not stat.S_ISLNK(sa.st_mode) and not whiteout:
                seen = xattrs(b)
                if stat.S_ISDIR(sa.st_mode) and _holds_whiteout(a):
                    # the markers of a directory with escaped whiteouts (format.md §5.4)
                    for key in WHITEOUT_DIR_MARKERS:
                        seen.pop(key, None)
                assert seen == xattrs(a), b
            checked += 1
    return checked


def snapshot(
    root: Path, *, hide_xattr: Callable[[str], bool] | None = None
) -> dict[str, tuple[object, ...]]:
    """Everything a reader sees of a tree, by relative path: type and mode, owner, size,
    mtime (ns), rdev, link count (not of directories), content digest or link target,
    xattrs (but those ``hide_xattr`` names).  Inode numbers and devices aside."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                what: object = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            else:
                what = None
            nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
            attrs = None if stat.S_ISLNK(st.st_mode) else xattrs(path, hide_xattr)
            out[str(path.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev,
                nlink, what, attrs,
            )  # fmt: skip
    return out


def attached_loop_devices() -> dict[str, str]:
    """Loop devices in use and their backing files."""
    out = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        out[backing.parent.parent.name] = backing.read_text().strip()
    return out


def object_of(image: Path, path: bytes, store: Path) -> Path:
    """The object in ``store`` that ``path`` of ``image`` redirects to."""
    from composefs.erofs.reader import load_tree

    node = load_tree(image).lookup(path)
    assert node is not None and node.payload is not None
    return store / os.fsdecode(node.payload)


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def meminfo_cached() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Cached line in /proc/meminfo")


def cached_growth(
    obj: Path,
    files: tuple[Path, Path],
    payload: bytes,
    *,
    first_max: float,
    after_evict: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """How much the page cache (``Cached``) grows reading ``files`` one after the other,
    both backed by the object ``obj``, from cold.  /proc/meminfo is machine-wide, so up
    to three tries: the first whose figures look undisturbed (the first read growing by
    the payload size, at most ``first_max`` times it; the second by under a fifth) is
    returned, else the last."""
    size = len(payload)
    for _attempt in range(3):
        evict(obj)
        if after_evict is not None:
            after_evict()
        before = meminfo_cached()
        assert files[0].read_bytes() == payload
        middle = meminfo_cached()
        assert files[1].read_bytes() == payload
        after = meminfo_cached()
        first, second = middle - before, after - middle
        if size * 0.8 < first < size * first_max and second < size * 0.2:
            break
    return first, second
