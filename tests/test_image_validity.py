"""Images we write are valid for other tools and the kernel.

fsck.erofs (erofs-utils) checks every image the asset suite builds; as root, images are
mounted read-only as EROFS (file-backed) and every file is compared with its dump line.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, UPSTREAM, Asset, asset_params, have_tool

from composefs import dumpfile
from composefs.erofs.format import OVERLAY_ESCAPED_PREFIX, OVERLAY_PREFIX
from composefs.erofs.writer import build_image
from composefs.tree import S_IFCHR, S_IFMT, S_IFREG, Inode, Tree

needs_fsck = pytest.mark.skipif(not have_tool("fsck.erofs"), reason="fsck.erofs not installed")


def fsck(image: Path) -> None:
    result = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_fsck
@pytest.mark.parametrize("asset", asset_params())
def test_fsck_accepts_asset_image(asset: Asset, tmp_path: Path) -> None:
    tree = dumpfile.parse(asset.read(), strict=asset.strict)
    image = tmp_path / "image"
    image.write_bytes(build_image(tree, **asset.version_kwargs))
    fsck(image)


@needs_fsck
def test_fsck_accepts_demo_image(tmp_path: Path) -> None:
    tree = dumpfile.parse((REPO / "examples/demo.dump").read_bytes(), strict=True)
    image = tmp_path / "demo.img"
    image.write_bytes(build_image(tree))
    fsck(image)


# -- kernel mount ------------------------------------------------------------------------------


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting EROFS needs root"
    try:
        with open("/proc/filesystems") as f:
            if "erofs" not in f.read():
                return "the kernel has no EROFS support"
    except OSError as e:
        return f"cannot read /proc/filesystems: {e}"
    return None


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Yields (image path, mount point); unmounts afterwards."""
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    image = tmp_path / "image.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield image, mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def _mount(image: Path, mnt: Path) -> None:
    result = subprocess.run(
        ["mount", "-t", "erofs", "-o", "ro", str(image), str(mnt)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"file-backed EROFS mount failed: {result.stderr.strip()}")


def _expected_xattrs(inode: Inode) -> dict[bytes, bytes]:
    """The xattrs the writer stores for an inode (format.md §5), as the kernel lists them."""
    out = {
        (
            OVERLAY_ESCAPED_PREFIX + k[len(OVERLAY_PREFIX) :] if k.startswith(OVERLAY_PREFIX) else k
        ): v
        for k, v in inode.xattrs.items()
    }
    if inode.mode & S_IFMT == S_IFREG and inode.size > 0 and not inode.content:
        out[b"trusted.overlay.metacopy"] = (
            b"" if inode.digest is None else b"\x00\x24\x00\x01" + inode.digest
        )
        if inode.payload:
            out[b"trusted.overlay.redirect"] = b"/" + inode.payload
    if inode.is_whiteout():
        out[b"trusted.overlay.overlay.whiteout"] = b""
        out[b"user.overlay.whiteout"] = b""
    return out


def _listed_xattrs(path: bytes, is_symlink: bool) -> dict[bytes, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if is_symlink and name.startswith("user."):
            # The VFS refuses user.* on symlinks (ENODATA) although EROFS lists them.
            continue
        out[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
    return out


def compare_with_tree(tree: Tree, mnt: Path) -> int:
    """Check every name of the tree in the mounted image; returns how many were checked."""
    root = os.fsencode(mnt)
    seen_ino: dict[int, int] = {}
    checked = 0
    for path, inode in tree.walk():
        full = root + (b"" if path == b"/" else path)
        st = os.lstat(full)
        ftype = inode.mode & S_IFMT
        mode = inode.mode & 0xFFFF
        if inode.is_whiteout():
            mode = S_IFREG | (mode & ~S_IFMT)  # stored escaped (format.md §5.4)
        assert st.st_mode == mode, path
        assert (st.st_uid, st.st_gid) == (inode.uid, inode.gid), path
        assert (st.st_mtime_ns) == inode.mtime_sec * 10**9 + inode.mtime_nsec, path
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(full) == inode.payload, path
        elif stat.S_ISREG(st.st_mode):
            expected_size = 0 if inode.is_whiteout() else inode.size
            assert st.st_size == expected_size, path
            # External files are all holes in the metadata image: overlayfs supplies content.
            # (The kernel refuses reads of the reference's 43-bit chunks: sizes > 4 GiB are
            # only checked by size.)
            if expected_size < 1 << 32:
                with open(full, "rb") as f:
                    data = f.read(1 << 16)
                expected = inode.content or bytes(min(expected_size, 1 << 16))
                assert data == expected, path
            assert st.st_nlink == inode.nlink, path
        elif ftype in (S_IFCHR, stat.S_IFBLK):
            assert st.st_rdev == inode.rdev, path
        if not inode.is_dir():
            # hardlinks: one inode under every name
            assert seen_ino.setdefault(id(inode), st.st_ino) == st.st_ino, path
        is_symlink = stat.S_ISLNK(st.st_mode)
        listed = _listed_xattrs(full, is_symlink)
        for key, value in _expected_xattrs(inode).items():
            if is_symlink and key.startswith(b"user."):
                continue
            assert listed.get(key) == value, (path, key)
        checked += 1
    # the root whiteout stubs hide the object store's xx directories
    for i in range(256):
        name = root + b"/%02x" % i
        if tree.root.entries is not None and b"%02x" % i not in tree.root.entries:
            st = os.lstat(name)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    return checked


MOUNT_CASES = [
    ("demo.dump", REPO / "examples/demo.dump", True),
    ("special.dump", UPSTREAM / "special.dump", True),
    ("longlink.dump", UPSTREAM / "longlink.dump", False),
    ("honggfuzz-long-symlink.dump", UPSTREAM / "honggfuzz-long-symlink.dump", True),
    ("bigfile-xattr.dump", UPSTREAM / "bigfile-xattr.dump", True),
    ("config-with-hard-link.dump.gz", UPSTREAM / "config-with-hard-link.dump.gz", True),
]


@pytest.mark.parametrize(("name", "path", "strict"), MOUNT_CASES, ids=[c[0] for c in MOUNT_CASES])
def test_kernel_mount_matches_dump(
    name: str, path: Path, strict: bool, mounted: tuple[Path, Path]
) -> None:
    if not path.exists():
        pytest.skip(f"{path} not found (../shared absent)")
    import gzip

    data = path.read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    tree = dumpfile.parse(data, strict=strict)
    image, mnt = mounted
    image.write_bytes(build_image(tree))
    _mount(image, mnt)
    assert compare_with_tree(tree, mnt) > 1
