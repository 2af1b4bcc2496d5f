"""Helpers for the repository tests: deterministic file contents, small trees, a snapshot
of everything in a directory (to prove a failed command changed nothing), and reading an
image's files back through the repository's objects without mounting."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

from composefs import fsverity

BIN = Path(sys.executable).parent
INLINE_MAX = 64  # files up to this size are stored inside the image, not as objects


def blob(tag: str, size: int) -> bytes:
    """``size`` bytes, the same for the same tag, different for different tags."""
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """A directory holding ``files`` (relative path -> content)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def object_rel(data: bytes) -> str:
    """``XX/<62 hex>``: where ``data`` lives under ``objects/``."""
    h = fsverity.digest(data).hex()
    return f"{h[:2]}/{h[2:]}"


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root``: symlink targets, directory modes, and for files inode,
    mtime, ctime, size and a hash of the content.  Equal snapshots: nothing was changed
    (nor rewritten in place)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, digest)
    return out


def object_files(repo: Path) -> dict[str, Path]:
    """``XX/<62 hex>`` -> path, for every file in ``objects/`` that has an object's name."""
    out = {}
    for d in sorted((repo / "objects").iterdir()):
        if len(d.name) == 2 and d.is_dir():
            for f in sorted(d.iterdir()):
                out[f"{d.name}/{f.name}"] = f
    return out


def read_back(repo: Path, image_id: str) -> dict[str, bytes]:
    """The regular files of an image of ``repo``, their content read through its objects:
    what a mount would show, without mounting."""
    from composefs.erofs.reader import load_tree

    tree = load_tree(repo / "objects" / image_id[:2] / image_id[2:])
    out = {}
    for path, node in tree.walk():
        if stat.S_ISREG(node.mode):
            if node.content is not None:
                data = node.content
            elif node.size == 0:
                data = b""
            else:
                assert node.payload is not None
                data = (repo / "objects" / os.fsdecode(node.payload.lstrip(b"/"))).read_bytes()
            out[os.fsdecode(path.lstrip(b"/"))] = data
    return out


def source_files(root: Path) -> dict[str, bytes]:
    """The regular files below ``root`` and their content, to compare with read_back."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def mkcomposefs(src: Path, image: Path, *extra: str) -> None:
    r = subprocess.run(
        [str(BIN / "mkcomposefs"), *extra, str(src), str(image)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == target for line in lines)
